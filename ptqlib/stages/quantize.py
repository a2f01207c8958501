"""The quantize stage: the registered method's ``quantize`` and ``save``, timed, and what the
notebook reports about the result (calibration windows, weight error).

The methods are modules of ``ptqlib.methods`` (``python -m ptqlib methods`` lists them); this module
holds what every method shares.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ptqlib import artifacts

if TYPE_CHECKING:
    from ptqlib.study.params import QuantizeParams


def calibration_windows(input_ref: str, p: QuantizeParams) -> torch.Tensor | None:
    """GPTQ's calibration data: ``calib_samples`` windows of ``calib_seq_len`` tokens of pydoc's
    train split (``calib_seed`` picks them), tokenized as the input model; None for a method that
    needs none."""
    from ptqlib.methods import quantize_method
    from ptqlib.models import load_tokenizer
    from ptqlib.study.kinds import as_params
    from ptqlib.text import text_windows

    p = as_params("quantize", p)
    if not quantize_method(p.method).calibrates(p):
        return None
    tok = load_tokenizer(artifacts.float_model_dir(input_ref))
    return text_windows(tok, "train", p.calib_seq_len, p.calib_samples, seed=p.calib_seed)


def quantize(input_ref: str, p: QuantizeParams, calib: torch.Tensor | None = None, progress: bool = False):
    """Quantize the float model at ``input_ref`` -> (model, tokenizer, stats incl. quant_seconds)."""
    from ptqlib.methods import quantize_method
    from ptqlib.study.kinds import as_params

    p = as_params("quantize", p)
    method = quantize_method(p.method)
    t0 = time.perf_counter()
    model, tok, stats = method.quantize(input_ref, p, calib, progress)
    stats = dict(stats or {})
    stats["quant_seconds"] = time.perf_counter() - t0
    if method.calibrates(p):  # the precision of the calibration forwards (the codes' arithmetic is fp32)
        from ptqlib.precision import resolve

        stats["precision"] = method.fixed_precision or resolve(p.precision)
    model.eval()
    return model, tok, stats


def save(model, tokenizer, p: QuantizeParams, output_dir: str | Path, input_ref: str | None = None) -> dict:
    """Write the stage's artifact (the method's layout) and its artifact.json; returns the latter."""
    from ptqlib.methods import quantize_method
    from ptqlib.study.kinds import as_params

    p = as_params("quantize", p)
    info = quantize_method(p.method).save(model, tokenizer, p, output_dir)
    artifacts.save(output_dir, info, input_ref)
    return info


def weight_error(model_fp, model_q) -> dict[str, float]:
    """Relative Frobenius error ||W - W_hat|| / ||W|| per quantized linear (names as in the model)."""
    from ptqlib.methods import dense_weight

    fp = dict(model_fp.named_modules())
    out = {}
    for name, mod in model_q.named_modules():
        w = dense_weight(mod)  # the quantize method whose layer it is de-quantizes it (methods' hooks)
        if w is not None and name in fp:
            ref = fp[name].weight.detach().float()
            out[name] = (torch.linalg.norm(ref - w.to(ref.device)) / torch.linalg.norm(ref)).item()
    return out


def quantize_metrics(model, werr: dict[str, float], stats: dict, output_dir: str | Path) -> dict:
    """The quantize stage's metrics: time, mean relative weight error, deployed / stored size
    (``artifacts.size_metrics``)."""
    metrics = {"quant_seconds": stats["quant_seconds"], "weight_rel_err_mean": sum(werr.values()) / max(1, len(werr)),
               **artifacts.size_metrics(model, output_dir)}
    if stats.get("weights_rescaled"):  # AWQ: W diag(s) against W measures the scaling, not the rounding
        metrics["weight_rel_err_mean"] = math.nan
    for k in ("mean_gptq_rel_err", "mean_rtn_rel_err", "total_damp_retries", "n_fallback", "precision"):
        if k in stats:
            metrics[k] = stats[k]
    return metrics
