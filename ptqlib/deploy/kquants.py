"""llama.cpp's K-quants (Q4_K_M, Q3_K_M, ...), the formats most local models ship in, made by llama.cpp's own
quantizer and read back into torch exactly.

A K-quant file is what ``llama-quantize model-f16.gguf out.gguf Q4_K_M`` writes: super-blocks of 256 weights
along the input dimension, each of 8 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K) sub-blocks with their own scale
(and min) coded in 4 to 8 bits against one fp16 ``d`` (and ``dmin``) per super-block:
``w = d * sc_j * q - dmin * m_j``. A *mix* (``_S`` / ``_M`` / ``_L``) gives some tensors more bits: for
``Q4_K_M`` half of the ``attn_v`` and ``ffn_down`` tensors and the embedding get Q6_K. A tensor whose input
size is not a multiple of 256 cannot hold a K-quant; llama.cpp then writes its fallback type (``Q4_K`` ->
``Q5_0``, ``Q3_K`` -> ``IQ4_NL``/``Q4_0``..., ``Q5_K`` -> ``Q5_1``, ``Q6_K`` -> ``Q8_0``): SmolLM2-135M's hidden
size 576 puts every layer but ``ffn_down`` there (:func:`quantize_file` returns each tensor's type).

Why this module: neither the ``gguf`` package nor transformers quantizes to K-quant *mixes* (``gguf.quants``
has no Q*_K quantizer; the mix rules live in llama.cpp's ``llama_model_quantize``), so the file comes from
llama.cpp through llama-cpp-python's binding, from the F16 export of :func:`ptqlib.deploy.gguf.export_gguf`.
Reading it back uses ``gguf.quants.dequantize``, the reference de-quantizer, and undoes the export's name
mapping, rotary row order (Llama) and norm shift (Gemma 3), so the torch model holds exactly the weights llama.cpp computes with
(``tests/deploy/test_kquants.py``).

Importance matrix (``imatrix``): llama.cpp weighs each weight's rounding error by the mean square of the input
column it multiplies, over calibration text (``llama-imatrix``'s statistic, ``in_sum2 / counts``), so the columns
that carry large activations are rounded more carefully. :func:`importance` computes it with hooks on the float
model's linear layers, keyed by GGUF tensor name; :func:`quantize_file` hands it to ``llama_model_quantize`` as its
C array of ``llama_model_imatrix_data`` (name, values, size; a null name ends it), as ``llama-quantize --imatrix``
does after reading its file.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .blocks import _rope_rows
from .gguf import LAYER_NAMES, NORM_SHIFT, ExportReport, TensorReport, read_tensors
from .types import ARCHITECTURES, ExportError

# type name -> (llama_ftype value, nominal bits): llama.h's LLAMA_FTYPE_MOSTLY_* (a stable ABI enum)
KQUANT_TYPES: dict[str, tuple[int, int]] = {
    "Q2_K_S": (21, 2), "Q2_K": (10, 2), "Q3_K_S": (11, 3), "Q3_K_M": (12, 3), "Q3_K_L": (13, 3), "Q4_K_S": (14, 4),
    "Q4_K_M": (15, 4), "Q5_K_S": (16, 5), "Q5_K_M": (17, 5), "Q6_K": (18, 6),
}


def quantize_file(src: str | Path, dst: str | Path, type: str, threads: int | None = None,
                  imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's quantizer: the GGUF ``src`` (F16 / F32 weights) -> ``dst`` in the K-quant mix ``type``, with
    the importance matrix ``imatrix`` ({GGUF tensor name: mean square of each input column}, :func:`importance`)
    where given. Written to a temp file beside ``dst`` and renamed: a failure leaves no half file."""
    import llama_cpp

    if type not in KQUANT_TYPES:
        raise ExportError(f"K-quant type {type!r}: valid are {', '.join(KQUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = KQUANT_TYPES[type][0]
    params.nthread = threads or torch.get_num_threads()
    keep = _imatrix_array(imatrix) if imatrix else None  # alive until llama.cpp has read it
    if keep is not None:
        params.imatrix = ctypes.cast(keep[0], ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        with _quiet_llama():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"llama.cpp could not quantize {src} to {type} (llama_model_quantize returned {rc})")
        Path(tmp).replace(dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _imatrix_array(imatrix: dict[str, np.ndarray]) -> tuple:
    """``imatrix`` as llama.cpp's C array of ``llama_model_imatrix_data`` ending in a null entry, with the buffers
    its pointers point into (the caller keeps the tuple alive while llama.cpp reads it)."""
    import llama_cpp

    for name, v in imatrix.items():
        if not np.all(np.isfinite(v)) or (v < 0).any():
            raise ExportError(f"importance matrix of {name}: values must be finite and >= 0 (mean squares)")
    values = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in imatrix.items()}
    names = {n: ctypes.create_string_buffer(n.encode()) for n in values}
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    for e, (n, v) in zip(entries, values.items()):
        e.name = ctypes.cast(names[n], ctypes.c_char_p)
        e.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        e.size = v.size
    entries[len(values)].name = None  # the terminator llama.cpp stops at
    return entries, values, names


@torch.no_grad()
def importance(model: nn.Module, windows: torch.Tensor, precision: str = "fp32", batch: int = 8) -> dict[str, np.ndarray]:
    """llama-imatrix's statistic on ``windows`` (token ids, ``(n, seq)``): for each linear layer the export
    writes, the mean over every token of each input column's square, ``mean_t x_tj^2`` (``in_sum2 / counts``),
    keyed by its GGUF tensor name (``blk.0.attn_q.weight``; llama.cpp's q / k row order permutes outputs, not
    these input columns). The forwards run at ``precision`` (``ptqlib.precision``); sums in float64."""
    from ptqlib.precision import autocast

    names = {hf.removesuffix(".weight"): g for hf, (g, _, _) in gguf_names(model).items()}
    mods = {n: m for n, m in model.named_modules() if n in names and isinstance(m, nn.Linear)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        with autocast(precision, windows.device.type):
            for i in range(0, len(windows), batch):
                model(windows[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {names[n]: (sums[n] / counts[n]).float().cpu().numpy() for n in sums}


class _quiet_llama:
    """llama.cpp logs every tensor to stderr while it quantizes: its log callback is swapped for a silent one."""

    def __enter__(self):
        import llama_cpp

        self._cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import llama_cpp

        llama_cpp.llama_log_set(ctypes.cast(0, llama_cpp.llama_log_callback), ctypes.c_void_p(0))
        return False


def gguf_names(model: nn.Module) -> dict[str, tuple[str, torch.Tensor | None, float]]:
    """transformers parameter name -> (GGUF tensor name, the row order the export applied or None, the shift
    the export added), for the weights :func:`ptqlib.deploy.gguf.export_gguf` writes: a Llama-style model (q and
    k rows reordered for llama.cpp's interleaved rotary) or Gemma 3 (NEOX rotary, no reordering; its norms
    stored as ``1 + w``); a tied output is the embedding."""
    cfg = model.config
    arch = ARCHITECTURES[cfg.model_type]
    shift = NORM_SHIFT[arch]
    out = {"model.embed_tokens.weight": ("token_embd.weight", None, 0.0),
           "model.norm.weight": ("output_norm.weight", None, shift)}
    if not getattr(cfg, "tie_word_embeddings", False):
        out["lm_head.weight"] = ("output.weight", None, 0.0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads} \
        if arch == "llama" else {}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_NAMES[arch].items():
            rows = _rope_rows(heads[hf] * head_dim, heads[hf]) if hf in heads else None
            out[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{gg}.weight", rows, shift if gg.endswith("_norm") else 0.0)
    return out


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Copy the de-quantized tensors of the GGUF file ``path`` into ``model`` (float layers, the same
    architecture as the exported one) -> {GGUF tensor name: its type}; every mapped weight must be in the file.
    A Gemma norm gets ``stored - 1`` (exact in float32 wherever ``1 + w >= 0.5``), so torch's ``1 + w`` is the
    scale llama.cpp uses."""
    names = gguf_names(model)
    params = dict(model.named_parameters())
    types: dict[str, str] = {}
    try:
        tensors = read_tensors(path, [g for g, _, _ in names.values()], types)
    except KeyError as e:
        raise ExportError(f"{e.args[0]}; it is not an export of this architecture") from e
    for hf, (gname, rows, shift) in names.items():
        w = tensors[gname]
        if rows is not None:  # the export wrote row rows[k] at k: put it back
            back = torch.empty_like(w)
            back[rows] = w
            w = back
        if w.shape != params[hf].shape:
            raise ExportError(f"{path}: {gname} has shape {tuple(w.shape)}; the model's {hf} is {tuple(params[hf].shape)}")
        params[hf].copy_((w - shift if shift else w).to(params[hf].dtype))
    return {g: types[g] for g, _, _ in names.values()}


def copy_file(src: str | Path, dst: str | Path) -> ExportReport:
    """A K-quant stage exported as it is: its llama.cpp file copied to ``dst`` (``files.copy_atomic``: no half
    file under the name), with the :func:`file_report` of the copy."""
    from ptqlib.files import copy_atomic

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return file_report(copy_atomic(src, dst))


def file_report(path: str | Path) -> ExportReport:
    """An :class:`~ptqlib.deploy.gguf.ExportReport` of a GGUF file scored as it is (nothing exported): each
    tensor's type and bytes; its weights are the model's own (exact, no error added)."""
    import gguf

    report = ExportReport(str(path), "as stored")
    for t in gguf.GGUFReader(str(path)).tensors:
        report.tensors.append(TensorReport(t.name, t.tensor_type.name, True, 0.0, int(t.n_bytes)))
    return report
