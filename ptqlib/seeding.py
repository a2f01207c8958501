"""Every random draw of a stage is a function of (pipeline seed, stage), never of the process's history.

A stage's draws come from three places: the adapter's initial weights (``finetune.prepare``), the
training run (data order, dropout: ``Trainer``'s ``seed`` / ``data_seed``, the pipeline seed) and the
calibration windows (``calib_seed``, the pipeline seed by default). Before this module the adapter
draw came from whatever state the process's global RNG was in: the same stage after other work in
one process, or in two fresh runners, started from different adapters, and every seed of a batch
run from the same one. :func:`derive_seed` gives each such stream its own seed from the pipeline
seed and the stream's name (so the adapter's initial weights and the training order are independent
draws), and :func:`seed_all` sets every generator a stage draws from.

``SCHEME`` names this rule in each stage record (``rng``): a fine-tuning record of a method that draws
its initial weights (``FinetuneMethod.draws_init``) without it was computed from an unseeded adapter
and counts as not finished (``engine.stage.usable``), so a cache from before re-runs those stages.
"""
from __future__ import annotations

import hashlib
import random

SCHEME = "stage-seeded-v1"  # the record's ``rng``: adapter init from derive_seed(seed, "finetune", method, "init")


def derive_seed(seed: int, *stream: str) -> int:
    """A 32-bit seed for the named ``stream`` of pipeline seed ``seed`` (sha256 of both: stable across
    processes, Python versions and machines, unlike ``hash``). 32 bits: numpy's legacy seeding takes no more."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: {seed!r} must be an integer >= 0")
    key = "/".join([str(seed), *stream]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (CPU and every CUDA device), as transformers'
    ``set_seed`` does, without importing transformers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device's generator
