"""Deployment: export to GGUF (``gguf``), run the file in llama.cpp (``llamacpp``), speed limits (``speed``)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gguf import ExportError, ExportReport, export_gguf


def __getattr__(name: str):
    """``export_gguf`` and its types load torch: imported when first asked for, so that
    ``ptqlib.deploy.types`` (read when a study file is validated) does not."""
    if name in ("ExportError", "ExportReport", "export_gguf"):
        from . import gguf

        return getattr(gguf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def deployed_metrics(export: "ExportReport", config, decode_tokens_per_s: float | None) -> dict:
    """The metrics of a GGUF export: file size, what its rounding added, and decode vs the bandwidth limit."""
    from .speed import bandwidth_ratio, copy_bandwidth_gbs, weight_bytes_per_token

    s = export.summary()
    per_token = weight_bytes_per_token([(t.name, t.nbytes) for t in export.tensors],
                                       bool(getattr(config, "tie_word_embeddings", False)))
    bw = copy_bandwidth_gbs()
    out = {"size_mb_gguf": s["size_mb"], "gguf_max_abs_err_exact": s["max_abs_err_exact"],
           "gguf_max_rel_err_exact": s["max_rel_err_exact"],
           "gguf_max_abs_err_lossy": s["max_abs_err_lossy"], "gguf_requantized_tensors": s["requantized"],
           "weight_mb_per_token": per_token / 2**20, "copy_bandwidth_gbs": bw}
    if decode_tokens_per_s and not math.isnan(decode_tokens_per_s):
        out["bandwidth_limit_tokens_per_s"] = bw * 1e9 / per_token
        out["bandwidth_ratio"] = bandwidth_ratio(decode_tokens_per_s, per_token, bw)
    return out


__all__ = ["ExportError", "ExportReport", "export_gguf", "deployed_metrics"]
