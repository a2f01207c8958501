"""Cost of the balanced adapters vs peft QLoRA: train step time, peak memory, deployable size,
generation speed. One invocation runs every method, each in its own subprocess so the peak
RSS of one does not leak into the next, and prints a markdown table with the settings.

    python bench/blora_cost.py --model tiny --steps 2          # quick check (seconds)
    python bench/blora_cost.py --model smollm2-135m --steps 3  # SmolLM2-135M-Instruct

Methods (all rank ``--rank``, alpha ``--alpha``, every q/k/v/o/gate/up/down of every decoder layer):

* ``qlora-nf4``: peft LoRA on a bitsandbytes NF4 (double-quant) base: QLoRA. Deployable:
  the 4-bit base + the 16/32-bit adapter (peft cannot merge into the 4-bit base exactly).
* ``qblora-nf4``: Q-BLoRA (pool 2, repeat 2, rank 2r) on the same NF4 base; not mergeable
  into the low-bit base, so deployed as base + adapter too.
* ``qlora-rtn``, ``qblora-rtn``, ``qalora-rtn``, ``qablora-rtn``: on an RTN ``--bits`` /
  ``--group-size`` ``QuantLinear`` base (peft LoRA through ``ptqlib.adapters.lora_quantlinear``);
  QA-LoRA and QA-BLoRA are deployed *merged* (zero points folded, float zeros), i.e. a pure
  low-bit model with no adapter; the other two as base + adapter.

Measures: trainable parameters; seconds per train step (forward + backward + AdamW, batch
``--batch`` x ``--seq`` random tokens, after one warm-up step; no gradient checkpointing for
any method); peak memory during training (CUDA: max allocated; CPU: the process's peak RSS
reset just before training via /proc/self/clear_refs, so model loading does not count, plus
its rise over the RSS at the reset); deployable size (bytes of the unique tensors in the
deployable model's state dict, in total and without the embedding / lm_head tensors); greedy
generation tokens/s of the deployable model (batch 1, ``--prompt-len`` prompt,
``--gen-tokens`` new tokens, KV cache on).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["qlora-nf4", "qblora-nf4", "qlora-rtn", "qblora-rtn", "qalora-rtn", "qablora-rtn"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_MARK = "BLORA_COST_RESULT "


# ---- memory helpers ---------------------------------------------------------------------------
def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (MB); ru_maxrss as a fallback for VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_and_reset_peak() -> bool:
    """Free what can be freed and reset the peak-RSS counter; True if the reset worked."""
    gc.collect()
    try:  # hand freed heap pages back to the OS so they do not count as resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _state_bytes(model, skip_ids: set[int] = frozenset()) -> int:
    """Bytes of the unique tensors (by storage) in ``model.state_dict()``, tied ones once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=False).values():
        if not hasattr(t, "untyped_storage"):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen or t.untyped_storage().data_ptr() in skip_ids:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ---- the NF4 base, built from the model in memory ---------------------------------------------
def replace_with_bnb_4bit(
    model,
    quant_type: str = "nf4",
    compute_dtype=None,
    compress_statistics: bool = True,
    blocksize: int = 64,
    target_modules=None,
):
    """Replace decoder-layer ``nn.Linear``s by ``bitsandbytes.nn.Linear4bit`` built from their
    weights, in place (NF4 by default: Linear4bit itself defaults to FP4). Quantization happens
    on the ``.to(device)`` of the new layer; bitsandbytes >= 0.46 runs it on CPU. (The benchmark's own
    builder: it quantizes a model already in memory, where the library goes through transformers.)"""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    from ptqlib.adapters.blora import target_layers
    from ptqlib.quant.layers import set_module

    compute_dtype = compute_dtype or torch.float32
    names = [n for n, m in target_layers(model, target_modules).items() if type(m) is nn.Linear]  # not Linear4bit
    with torch.no_grad():
        for n in names:
            lin = model.get_submodule(n)
            dev = lin.weight.device
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=compress_statistics, quant_type=quant_type, device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                quant_type=quant_type, compress_statistics=compress_statistics, blocksize=blocksize,
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.detach().clone().to("cpu"), requires_grad=False)
            set_module(model, n, q.to(dev))
    return model


# ---- one method, in its own process -------------------------------------------------------------
def _build(method: str, args):
    import torch

    from ptqlib.adapters.blora import apply_adapter
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model

    model, _tok = load_model(args.model, device=args.device)
    model.config.use_cache = False
    kind, base = method.split("-")
    if base == "nf4":
        replace_with_bnb_4bit(model, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    else:
        rtn_quantize_model(model, bits=args.bits, group_size=args.group_size, sym=False)
    gc.collect()
    if kind == "qlora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        kw = dict(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                  target_modules=TARGETS, task_type="CAUSAL_LM")
        if base == "nf4":
            cfg = LoraConfig(**kw)
        else:  # peft does not know QuantLinear: ptqlib registers it as a custom module
            from ptqlib.adapters.lora_quantlinear import lora_config

            cfg = lora_config(**kw)
        model = get_peft_model(model, cfg)
        factors = f"r={args.rank}"
    else:
        apply_adapter(model, kind, rank=args.rank, alpha=args.alpha, target_modules=TARGETS)
        layers = model.ptqlib_adapter_config["layers"].values()
        pools = sorted({v["pool"] for v in layers})
        reps = sorted({v["repeat"] for v in layers})
        ranks = sorted({v["rank_eff"] for v in layers})
        rng = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        factors = f"p={'/'.join(map(str, pools))} k={'/'.join(map(str, reps))} r'={rng}"
    return model, factors


def _train(model, args) -> dict:
    import torch

    dev = torch.device(args.device)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    reset_ok = _release_and_reset_peak()
    rss0 = _rss_mb("VmRSS")
    step()  # warm-up: allocates optimizer state and caches
    times = []
    for _ in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {  # median: robust to the odd step slowed down by other processes
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "train_tok_s": args.batch * args.seq / statistics.median(times),
    }
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_rise_mb"] = out["peak_mb"] - base_mem
        out["peak_kind"] = "cuda max allocated"
    else:
        out["peak_mb"] = _rss_mb("VmHWM")
        out["peak_rise_mb"] = out["peak_mb"] - rss0
        out["peak_kind"] = "peak RSS (reset before training)" if reset_ok else "peak RSS (whole process)"
    opt = None  # frees the optimizer state (step() closes over opt: del would confuse linters)
    model.zero_grad(set_to_none=True)
    return out


def _deploy(model, method: str) -> tuple[object, str]:
    kind = method.split("-")[0]
    if kind in ("qalora", "qablora"):
        from ptqlib.adapters.blora import merge_adapters

        return merge_adapters(model), "merged low-bit (float zeros)"
    return model, "low-bit base + adapter"


def _embedding_ids(model) -> set[int]:
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, get, lambda: None)()
        if m is not None and getattr(m, "weight", None) is not None:
            ids.add(m.weight.untyped_storage().data_ptr())
    return ids


def _generate(model, args) -> float:
    import torch

    model.eval()
    cfg = model.config if hasattr(model, "config") else model.get_base_model().config
    cfg.use_cache = True
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(args.device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(input_ids=prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return (out.shape[1] - prompt.shape[1]) / dt


def worker(method: str, args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, factors = _build(method, args)
    res = {"method": method, "factors": factors, "build_s": time.perf_counter() - t0}
    res.update(_train(model, args))
    model, deploy = _deploy(model, method)
    res["deployable"] = deploy
    res["size_bytes"] = _state_bytes(model)
    res["size_bytes_excl_embed"] = _state_bytes(model, skip_ids=_embedding_ids(model))
    res["gen_tok_s"] = _generate(model, args)
    res["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


# ---- driver -------------------------------------------------------------------------------------
def _fmt_table(rows: list[dict]) -> str:
    head = ("| method | adapter | trainable | step s, median (min-max) | train tok/s | peak MB | rise MB | deployable | "
            "size MB | size MB excl. emb. | gen tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['method']} | {r['factors']} | {r['trainable']:,} | "
            f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | "
            f"{r['train_tok_s']:.0f} | {r['peak_mb']:.0f} | {r['peak_rise_mb']:.0f} | {r['deployable']} | "
            f"{r['size_bytes'] / 2**20:.2f} | {r['size_bytes_excl_embed'] / 2**20:.2f} | {r['gen_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def _settings(args) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    threads = args.threads or torch.get_num_threads()
    return (
        f"model `{args.model}`, device {args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {threads} torch threads), fp32 compute; batch {args.batch} x {args.seq} random "
        f"tokens, median of {args.steps} timed steps after 1 warm-up, AdamW lr 1e-4, no gradient checkpointing; rank "
        f"{args.rank}, alpha {args.alpha}, targets {'/'.join(t.split('_')[0] for t in TARGETS)}; NF4 base: "
        f"bitsandbytes {bitsandbytes.__version__} Linear4bit nf4, blocksize 64, double quant; RTN base: "
        f"{args.bits}-bit, group {args.group_size}, asymmetric, QuantLinear (dequantize per call); generation: "
        f"greedy, batch 1, prompt {args.prompt_len}, {args.gen_tokens} new tokens; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}. Sizes: unique state-dict tensors "
        "(fp32 embeddings/norms included in 'size MB')."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="ptqlib model name ('tiny' for a quick check)")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); on a loaded machine 1 gives far steadier timings")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per method")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    if args.worker:
        print(_MARK + json.dumps(worker(args.worker, args)), flush=True)
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; valid: {METHODS}")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for m in methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--device", args.device, "--worker", m]
        print(f"[blora_cost] {m} ...", file=sys.stderr, flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            rows.append({"method": m, "error": f"timeout after {args.timeout}s"})
            continue
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith(_MARK)), None)
        if p.returncode != 0 or line is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"method": m, "error": tail[0][:200]})
            print(p.stderr[-3000:], file=sys.stderr)
            continue
        rows.append(json.loads(line[len(_MARK):]))
    settings = _settings(args)
    peak_kind = next((r["peak_kind"] for r in rows if "peak_kind" in r), "peak memory")
    print(f"\n**Settings**: {settings} Peak MB: {peak_kind}; rise MB: its increase over the memory at the reset.\n")
    print(_fmt_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
