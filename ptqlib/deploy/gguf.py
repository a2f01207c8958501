"""Export a study model to GGUF, the file format of llama.cpp (docs/methods.md, "Deployment").

What maps exactly (ggml's block formats, 32 weights per block along the input dimension):

* ``Q4_1``: ``x = d * q + m`` with 4-bit ``q`` and 16-bit ``d``, ``m`` per block. A ptqlib
  ``QuantLinear`` holds ``w = s * (q - z)`` per group of ``g`` inputs, so ``d = s``,
  ``m = -s * z`` and the codes are copied, for integer zero points (GPTQ, RTN) and for float
  ones (merged QA-LoRA / QA-BLoRA, exported L4Q) alike. Groups of ``g = 32k`` inputs give k
  blocks with the same ``(d, m)``; 2- and 3-bit codes fit 4-bit slots (exact, a larger file
  than their bits). The only change is rounding ``d`` and ``m`` to fp16: ``ExportReport``
  gives the largest weight error it adds.
* ``Q8_0``: ``x = d * q`` with int8 ``q``: ptqlib's symmetric 8-bit grid (zero 128), codes
  shifted by 128.
* Float weights (embeddings, unquantized layers) are written as ``F16``; norms as ``F32``.

What does not map, and fails with a reason unless ``lossy=True`` re-quantizes from the
de-quantized float weight (``gguf.quants.quantize``, the reference quantizer) and reports its
error: NF4 (a non-uniform grid), act-order without static groups (a column permutation that no
GGUF block format stores), groups that are not a multiple of 32, asymmetric 8-bit.

Why blocks are packed here: the ``gguf`` package quantizes floats (choosing its own ``d``,
``m``), but has no entry point for *given* codes and grids, which is the whole point of an
exact export. Everything else (header, metadata, tensor layout, tokenizer) goes through
``gguf.GGUFWriter`` and ``gguf.SpecialVocab``.

Architectures (``types.ARCHITECTURES``): Llama-style models (SmolLM2, the tiny test model), where llama.cpp
applies rotary embeddings to interleaved pairs and transformers rotates two halves, so the rows of the q and k
projections are permuted per head (``_rope_rows``), as llama.cpp's own converter does (a row permutation moves
whole rows, so it is exact for codes too); and Gemma 3 (``gemma3``: QK-norm, pre- and post-norms, sliding and
global layers), whose rotary halves llama.cpp keeps (NEOX), whose RMS norms compute ``x * (1 + w)`` (the file
stores ``1 + w``, as llama.cpp's converter writes it) and whose layer pattern and rope bases llama.cpp fixes
(``types.refusal`` says when a config differs).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptqlib.quant.qlinear import QuantLinear

from .blocks import _rope_rows, encode_exact, encode_float, exact_type
from .types import ARCHITECTURES, TYPES, ExportError, refusal, rope_theta

log = logging.getLogger(__name__)


# transformers module name -> GGUF tensor name (llama.cpp's LLM_ARCH_LLAMA)
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# transformers -> GGUF per llama.cpp architecture (LLM_ARCH_GEMMA3: QK-norm, a norm before and after each sublayer)
LAYER_NAMES = {
    "llama": _LAYER_NAMES,
    "gemma3": {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"},
}
NORM_SHIFT = {"llama": 0.0, "gemma3": 1.0}  # Gemma's RMS norms scale by 1 + w: the file stores 1 + w


@dataclass
class TensorReport:
    name: str
    gguf_type: str
    exact: bool  # codes copied (True) or re-quantized / cast (False)
    max_abs_err: float  # max |w_gguf - w_ptqlib| over the tensor
    nbytes: int
    max_abs_w: float = 0.0  # max |w_ptqlib|, so the error can be read relative to the weights' range


@dataclass
class ExportReport:
    path: str
    file_type: str
    tensors: list[TensorReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return Path(self.path).stat().st_size

    @property
    def max_abs_err_exact(self) -> float:
        """Largest error over the tensors whose codes were copied: the fp16 rounding of d and m."""
        return max((t.max_abs_err for t in self.tensors if t.exact and t.gguf_type.startswith("Q")), default=0.0)

    @property
    def max_rel_err_exact(self) -> float:
        """The same, relative to each tensor's largest weight."""
        return max((t.max_abs_err / t.max_abs_w for t in self.tensors
                    if t.exact and t.gguf_type.startswith("Q") and t.max_abs_w > 0), default=0.0)

    @property
    def max_abs_err_lossy(self) -> float:
        return max((t.max_abs_err for t in self.tensors if not t.exact), default=0.0)

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.gguf_type] = counts.get(t.gguf_type, 0) + 1
        return {"path": self.path, "size_mb": self.nbytes / 2**20, "file_type": self.file_type,
                "tensor_types": counts, "requantized": sum(not t.exact and t.gguf_type.startswith("Q") for t in self.tensors),
                "max_abs_err_exact": self.max_abs_err_exact,
                "max_rel_err_exact": self.max_rel_err_exact, "max_abs_err_lossy": self.max_abs_err_lossy,
                "notes": list(self.notes)}


# ---- model -> file ----------------------------------------------------------------------------
def _check_arch(cfg) -> None:
    if why := refusal(cfg.to_dict()):
        raise ExportError(f"cannot write this model to GGUF: {why}")


def _linear_tensor(mod: nn.Module, name: str, rows: torch.Tensor | None, want: str, lossy: bool,
                   report: ExportReport):
    """(data, raw_dtype) for one linear layer's weight, following ``want`` (see ``export_gguf``)."""
    import gguf

    if isinstance(mod, QuantLinear):
        w = mod.dequantize_weight(torch.float32)  # once: the lossy paths and the report's max |w| use it
        gtype, why = exact_type(mod)
        target = {"auto": gtype, "q4_1": "Q4_1", "q8_0": "Q8_0", "f16": "F16"}[want]
        if target == "Q4_1" and gtype == "Q4_1" or target == "Q8_0" and gtype == "Q8_0":
            data, err = encode_exact(mod, target)
            exact = True
        elif target == "F16":
            data, err = encode_float(w, "F16")
            exact = False
        else:
            if not lossy:
                reason = why or f"{mod.bits}-bit codes do not fit {target} exactly"
                raise ExportError(f"{name}: {reason}. Pass --lossy to re-quantize the de-quantized weight "
                                  f"(the error is reported), or choose --type f16")
            target = target or ("Q8_0" if mod.bits == 8 else "Q4_1")
            data, err = encode_float(w, target)
            exact = False
        bias = mod.bias
    elif isinstance(mod, nn.Linear):
        w = mod.weight
        if w.__class__.__name__ == "Params4bit":
            if not lossy:
                raise ExportError(f"{name}: bitsandbytes NF4/FP4 is a non-uniform grid with no GGUF type; "
                                  "pass --lossy to re-quantize the de-quantized weight (the error is reported)")
            import bitsandbytes.functional as bnbF

            w = bnbF.dequantize_4bit(w.data, w.quant_state).float()
            want = "q4_1" if want == "auto" else want
        target = {"auto": "F16", "q4_1": "Q4_1", "q8_0": "Q8_0", "f16": "F16"}[want]
        if target != "F16" and not lossy:
            raise ExportError(f"{name}: a float weight becomes {target} only by quantizing it; pass --lossy "
                              "(the error is reported), or export a quantized model")
        data, err = encode_float(w, target)
        exact = target == "F16"
        bias = mod.bias
    else:
        raise ExportError(f"{name}: {type(mod).__name__} is not exportable (merge adapters into the model first)")
    if rows is not None:
        data = data[rows.numpy()]
        bias = None if bias is None else bias[rows]
    report.tensors.append(TensorReport(name, target, exact, err, int(data.nbytes), float(w.detach().abs().max())))
    raw = getattr(gguf.GGMLQuantizationType, target)
    return data, raw, bias


def _write_tokenizer(writer, tokenizer, report: ExportReport) -> None:
    """Vocabulary, merges, special tokens and chat template (gguf.SpecialVocab reads the last three).

    A byte-level BPE (SmolLM2, tiny) is llama.cpp's ``gpt2`` model; a SentencePiece-style BPE with byte
    fallback (Gemma: ``▁``-marked pieces, ``<0xNN>`` bytes) its ``llama`` model, the pieces' scores their negated
    ids (earlier pieces first; ptqlib's llama.cpp runtime tokenizes with the model's own tokenizer, so only
    llama.cpp's own tokenizer would read them)."""
    import gguf

    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pt = backend.get("pre_tokenizer") or {}
    spm = bool((backend.get("model") or {}).get("byte_fallback")) and pt.get("type") != "ByteLevel"
    kinds = gguf.TokenType
    types = [int(kinds.CONTROL) if i in special else int(kinds.UNKNOWN) if i == tokenizer.unk_token_id
             else int(kinds.BYTE) if spm and len(t) == 6 and t.startswith("<0x") and t.endswith(">")
             else int(kinds.NORMAL) for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    # llama.cpp splits text before BPE with a named regex; byte-level BPE with GPT-2's split
    # (SmolLM2, the tiny model) is "gpt-2". Anything else gets llama.cpp's default split.
    if spm or (pt.get("type") == "ByteLevel" and pt.get("use_regex", True)):
        pre = "default" if spm else "gpt-2"
    else:
        pre = "default"
        report.notes.append(f"pre-tokenizer {pt.get('type')!r} not mapped: llama.cpp's default split is used "
                            "(ptqlib's llama.cpp runtime tokenizes with the model's own tokenizer)")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores([-float(i) for i in range(n)])
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        sv = gguf.SpecialVocab(Path(tmp), load_merges=not spm, n_vocab=n)
        # ptqlib's prompts come from the chat template, which has no BOS: set here, not after add_to_gguf, which
        # writes the tokenizer's own add_bos_token where it has one (a second key: "Duplicated key" warning)
        sv.add_special_token["bos"] = False
        sv.add_to_gguf(writer, quiet=True)


def export_gguf(model: nn.Module, tokenizer, path: str | Path, type: str = "auto", lossy: bool = False,
                name: str = "ptqlib") -> ExportReport:
    """Write ``model`` (float or ``QuantLinear`` layers) and its tokenizer to a GGUF file.

    ``type``: ``auto`` keeps every quantized layer's codes (Q4_1 for <= 4 bits, Q8_0 for
    symmetric 8 bits) and writes float layers as F16; ``q4_1`` / ``q8_0`` ask for that type for
    every linear layer (exact where the codes allow, otherwise only with ``lossy``); ``f16``
    writes de-quantized F16 weights. Embeddings are F16, norms F32 in every case.
    """
    import gguf

    if type not in TYPES:
        raise ExportError(f"type {type!r}: valid are {', '.join(TYPES)}")
    cfg = model.config
    _check_arch(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(str(path), type)
    # a unique temp file beside the target, renamed over it at the end: a killed or failed export (a full
    # disk) leaves no half file under the final name, and the temp goes with the failure
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write(gguf, model, tokenizer, cfg, tmp, type, lossy, name, report)
        Path(tmp).replace(path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"{path}: could not write the GGUF file ({e.strerror or e}); nothing was left "
                              f"behind") from e
        raise
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)
    return report


def _write(gguf, model: nn.Module, tokenizer, cfg, tmp: str, type: str, lossy: bool, name: str,
           report: ExportReport) -> None:
    """The GGUF file's header, key-values and tensors, to ``tmp``."""
    arch = ARCHITECTURES[cfg.model_type]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = _header(gguf, tmp, arch, cfg, type, name)
    _write_tokenizer(writer, tokenizer, report)

    def add_float(gname: str, t: torch.Tensor, gtype: str) -> None:
        data, err = encode_float(t, gtype)
        report.tensors.append(TensorReport(gname, gtype, True, err, int(data.nbytes)))
        writer.add_tensor(gname, data)

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.model
    add_float("token_embd.weight", body.embed_tokens.weight, "F16")
    for i, layer in enumerate(body.layers):
        for hf_name, g_name in LAYER_NAMES[arch].items():
            mod = layer.get_submodule(hf_name)
            gname = f"blk.{i}.{g_name}.weight"
            if g_name.endswith("_norm"):
                add_float(gname, mod.weight.float() + NORM_SHIFT[arch], "F32")
                continue
            rows = None  # llama.cpp's Llama rotates interleaved pairs: q and k rows reordered per head
            if g_name == "attn_q" and arch == "llama":
                rows = _rope_rows(mod.out_features, n_head)
            elif g_name == "attn_k" and arch == "llama":
                rows = _rope_rows(mod.out_features, n_kv)
            data, raw, bias = _linear_tensor(mod, gname, rows, type, lossy, report)
            writer.add_tensor(gname, data, raw_dtype=raw)
            if bias is not None:
                add_float(gname.replace(".weight", ".bias"), bias, "F32")
    add_float("output_norm.weight", body.norm.weight.float() + NORM_SHIFT[arch], "F32")
    tied = getattr(cfg, "tie_word_embeddings", False)
    if not tied:
        data, raw, _ = _linear_tensor(inner.lm_head, "output.weight", None,
                                      "auto" if type == "auto" else type, lossy, report)
        writer.add_tensor("output.weight", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _header(gguf, tmp: str, arch: str, cfg, type: str, name: str):
    """A ``GGUFWriter`` for ``arch`` with the model's hyper-parameters as llama.cpp reads them."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":  # the global layers' rope base; the sliding layers' (10000) is llama.cpp's own
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(rope_theta(cfg.to_dict(), "full_attention"))
        writer.add_sliding_window(cfg.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta(cfg.to_dict()))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"auto": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16}[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def read_tensors(path: str | Path, names: list[str] | None = None,
                 types: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """De-quantize tensors of a GGUF file with the ``gguf`` package's own reader -> float32 ``(rows, cols)``;
    ``types``, if given, receives each read tensor's stored type (``Q4_K``, ``F32``, ...).

    One reader for all: parsing a file's metadata (a 49k-token vocabulary) costs seconds.
    """
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if names is None or t.name in names:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(
                [int(x) for x in reversed(t.shape.tolist())])
            if types is not None:
                types[t.name] = t.tensor_type.name
    missing = set(names or []) - set(out)
    if missing:
        raise KeyError(f"{path}: no tensors {sorted(missing)}")
    return out


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One de-quantized tensor (see :func:`read_tensors`)."""
    return read_tensors(path, [name])[name]
