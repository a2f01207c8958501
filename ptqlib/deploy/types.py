"""The GGUF weight types an export can ask for, the architectures it writes and why a model is refused, and its
error; torch-free, so validating a study file imports no torch."""

TYPES = ("auto", "q4_1", "q8_0", "f16")  # auto keeps the codes (Q4_1 / Q8_0, float layers F16)
# the transformers model_type values the GGUF export writes -> llama.cpp's architecture (LLM_ARCH_LLAMA, _GEMMA3)
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3"}
# llama.cpp's Gemma 3 graph fixes what Gemma 3's config may vary: every 6th layer global, the others sliding with
# rope base 10000, the attention scale 1/sqrt(head_dim), no soft-capping
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


class ExportError(ValueError):
    """A model or layer that the requested GGUF type cannot hold exactly (and ``lossy`` was off)."""


def _rope(cfg: dict, layer_type: str | None = None) -> dict:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        return rope[layer_type]
    return rope if isinstance(rope, dict) else {}


def rope_theta(cfg: dict, layer_type: str | None = None) -> float:
    """The rope base of a config (of its ``layer_type``'s layers where it has several)."""
    return float(_rope(cfg, layer_type).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _gemma3_refusal(cfg: dict) -> str | None:
    n, head = cfg.get("num_hidden_layers", 0), cfg.get("head_dim")
    want = ["full_attention" if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1 else "sliding_attention"
            for i in range(n)]
    kinds = [_rope(cfg, t).get("rope_type", "default") for t in ("full_attention", "sliding_attention")]
    if cfg.get("layer_types") and list(cfg["layer_types"]) != want:
        return (f"llama.cpp's Gemma 3 graph makes every {GEMMA3_SWA_PATTERN}th layer global and the others sliding; "
                f"this model's layer_types are {cfg['layer_types']}")
    if rope_theta(cfg, "sliding_attention") != GEMMA3_LOCAL_ROPE_THETA:
        return f"llama.cpp fixes Gemma 3's sliding layers' rope base at {GEMMA3_LOCAL_ROPE_THETA:g}"
    if any(k not in ("default", None) for k in kinds):
        return f"rope scaling {kinds} is not mapped to GGUF metadata yet; valid: default"
    if cfg.get("query_pre_attn_scalar", head) != head:
        return "llama.cpp scales Gemma 3's attention by 1/sqrt(head_dim); query_pre_attn_scalar differs"
    if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping") or cfg.get("use_bidirectional_attention"):
        return "soft-capping and bidirectional attention are not mapped to GGUF metadata"
    return None


def refusal(cfg: dict) -> str | None:
    """Why ptqlib's GGUF export cannot write a model of this config (a ``config.json`` dict), or None."""
    cfg = cfg.get("text_config", cfg)
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        return (f"ptqlib writes GGUF for model_type {', '.join(ARCHITECTURES)} (SmolLM2, Gemma 3, tiny, and a tiny "
                f"Gemma 3 of llama.cpp's layer pattern); got {kind!r}")
    if kind == "gemma3_text":
        return _gemma3_refusal(cfg)
    rope = _rope(cfg).get("rope_type", _rope(cfg).get("type", "default"))
    if rope not in ("default", None):
        return f"rope scaling {rope!r} is not mapped to GGUF metadata yet; valid: default"
    return None
