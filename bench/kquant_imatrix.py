"""llama.cpp's K-quants with and without an importance matrix on SmolLM2-135M-Instruct: KL(16-bit || K-quant)
and top-1 agreement on held-out pydoc windows (the test split; the imatrix's calibration windows are the train
split's, as a quantize stage draws them).

    python bench/kquant_imatrix.py [--types Q4_K_M Q3_K_M] [--windows 16] [--calib 32]

docs/formats.md quotes its output.
"""
import argparse
import time

import torch

from ptqlib import artifacts
from ptqlib.methods.kquant import _TYPES
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import QuantizeParams
from ptqlib.text import text_windows

BITS_MIX = {t: bm for bm, t in _TYPES.items()}


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(windows[i:i + batch]).logits.float(), -1)
                      for i in range(0, len(windows), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M"], choices=sorted(BITS_MIX))
    ap.add_argument("--windows", type=int, default=16, help="held-out 256-token pydoc windows scored")
    ap.add_argument("--calib", type=int, default=32, help="256-token calibration windows of the imatrix")
    args = ap.parse_args()
    ref, tok, _ = artifacts.load(args.model, "cpu")
    held_out = text_windows(tok, "test", 256, args.windows, seed=0)
    ref_lp = log_probs(ref.float().eval(), held_out)
    print(f"{args.model}, {args.windows} x 256 held-out pydoc tokens, imatrix from {args.calib} x 256 train tokens")
    for ktype in args.types:
        bits, mix = BITS_MIX[ktype]
        for imatrix in (False, True):
            p = QuantizeParams(method="kquant", bits=bits, mix=mix, imatrix=imatrix, calib_samples=args.calib,
                               calib_seq_len=256, calib_seed=0, precision="fp32").__dict__
            t0 = time.perf_counter()
            model, _, _ = ptq.quantize(args.model, p, ptq.calibration_windows(args.model, p))
            lp = log_probs(model.float().eval(), held_out)
            kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
            top1 = (ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()
            print(f"{ktype} imatrix={imatrix!s:<5}: KL {kl:.4f} nats/token, top-1 {top1:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
