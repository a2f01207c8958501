"""Write the fixture of tests/quant/test_gptq_reference.py: the GPTQ reference's output on fixed layers.

For a 96 x 256 layer ``W`` and a Hessian ``H`` from correlated inputs (fixed seeds), run the
reference implementation's ``fasterquant`` (IST-DASLab/gptq ``gptq.py`` / ``quant.py``, imported
read-only from ``--reference-dir``, never copied into ptqlib) in the settings the test checks,
and store ``W``, ``H`` and each setting's de-quantized weight ``W_hat`` (the reference writes
fake-quantized weights back into the layer; it returns no codes) in one safetensors file.

Get the reference as for bench/gptq_benchmark.py (see its docstring), then::

    .venv/bin/python bench/gptq_reference_fixture.py      # seconds; writes tests/quant/data/gptq_reference.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gptq_benchmark import load_reference, reference_env  # noqa: E402

OUT, IN = 96, 256
# (name, bits, group_size, sym, act_order, static_groups); static groups only with act-order,
# where ptqlib's flag acts (the reference also applies them without act-order)
SETTINGS = [
    ("b2_g64_asym", 2, 64, False, False, False),
    ("b2_g64_sym", 2, 64, True, False, False),
    ("b4_g64_asym", 4, 64, False, False, False),
    ("b4_g64_sym", 4, 64, True, False, False),
    ("b3_g32_asym", 3, 32, False, False, False),
    ("b8_g128_asym", 8, 128, False, False, False),
    ("b4_gm1_asym", 4, -1, False, False, False),
    ("b4_g64_asym_actorder_static", 4, 64, False, True, True),
    ("b3_g64_asym_actorder", 3, 64, False, True, False),
]


def layer_and_hessian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (96, 256)`` and ``H = (2/N) X^T X`` of 2048 inputs with a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g) * 0.05
    mix = torch.randn(IN, IN, generator=g) / IN**0.5
    X = torch.randn(2048, IN, generator=g) @ (torch.eye(IN) + 2 * mix)  # correlated inputs
    X[:, :8] *= 5  # a few large-activation channels, as in LLMs (act-order then matters)
    H = 2 * X.t() @ X / X.shape[0]
    return W, H


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", type=Path, default=ROOT / "bench" / "_ext" / "gptq")
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "quant" / "data" / "gptq_reference.safetensors")
    a = p.parse_args(argv)
    RefGPTQ, Quantizer, commit = load_reference(a.reference_dir.resolve())
    W, H = layer_and_hessian()
    tensors = {"W": W, "H": H}
    for name, bits, g, sym, act_order, static in SETTINGS:
        lin = nn.Linear(IN, OUT, bias=False)
        lin.weight.data = W.clone()
        ref = RefGPTQ(lin)
        ref.H, ref.nsamples = H.clone(), 2048
        ref.quantizer = Quantizer()
        ref.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
        with reference_env():
            ref.fasterquant(blocksize=128, percdamp=0.01, groupsize=g, actorder=act_order, static_groups=static)
        tensors[name] = lin.weight.detach().float().clone()
        print(f"{name}: {int((tensors[name] != W).sum())} weights changed", flush=True)
    meta = {"reference": "IST-DASLab/gptq", "reference_commit": commit or "unknown",
            "settings": json.dumps(SETTINGS), "blocksize": "128", "percdamp": "0.01"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(a.out), metadata=meta)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
