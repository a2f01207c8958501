"""Training memory and step time of L4Q vs LoRA (peft, unquantized base) vs QLoRA (bnb NF4 + peft).

The L4Q paper's cost claim (Jeon et al., ACL 2025): L4Q trains in about LoRA's memory (one
frozen full-precision weight per layer, no stored weight gradient thanks to the custom
backward), not in QLoRA's (4-bit base), while producing a fully quantized model.

Protocol: every method runs in a *fresh subprocess* (so one method's allocator state cannot
leak into another's numbers) on the same model, the same random batch (``batch x seq`` token
ids, labels = inputs), the same LoRA rank / alpha / target modules, AdamW, no gradient
checkpointing (peft's ``prepare_model_for_kbit_training`` would turn it on for QLoRA only).

Memory. CUDA: ``torch.cuda.max_memory_allocated`` after the steps minus ``memory_allocated``
after setup. CPU: resident set size from ``/proc/self/status`` and ``getrusage``: ``setup`` =
RSS after model + adapter + optimizer are built, minus the RSS of the process before loading
(torch / transformers / peft / bitsandbytes imported in every worker alike); the peak
(``ru_maxrss``) is reset after setup by writing 5 to ``/proc/self/clear_refs`` so that a
transient peak while loading (QLoRA quantizes an fp model on load) cannot hide the training
peak; where that is not allowed, the delta falls back to ``ru_maxrss`` after the steps minus
``ru_maxrss`` after setup, and the table says so. Two CPU-specific corrections keep RSS
honest: every tensor is copied out of the safetensors mapping after setup (see
``_own_memory``), and workers run with a fixed glibc mmap threshold so freed tensors leave
RSS. Step times on CPU are for orientation only (shared cores, no fused kernels: bnb's CPU
NF4 path and L4Q's per-step re-quantization are both plain PyTorch/C++ ops).

Usage::

    python bench/l4q_memory.py                       # SmolLM2-135M, 4 bits, 3 steps
    python bench/l4q_memory.py --model tiny --steps 3
    python bench/l4q_memory.py --bits 3 --methods l4q,qat_lora,lora,qlora
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("l4q", "lora", "qlora", "qat_lora")
LABELS = {
    "l4q": "L4Q (W0 {dtype}, fused quant+LoRA)",
    "lora": "LoRA (peft, {dtype} base)",
    "qlora": "QLoRA (bnb NF4 + double quant, peft)",
    "qat_lora": "QAT-LoRA (fake-quant W0 + separate LoRA)",
}
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="ptqlib model name (smollm2-135m, tiny, a path)")
    p.add_argument("--steps", type=int, default=3,
                   help="training steps per method (the first is warm-up; ~1 min/step for SmolLM2 on 2 CPU cores)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="L4Q / QAT-LoRA bits (QLoRA is NF4)")
    p.add_argument("--group-size", type=int, default=64,
                   help="L4Q quantizer group (64 divides SmolLM2's 576; bnb NF4 block is 64 too)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="base weight / compute dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: all cores)")
    p.add_argument("--methods", default="l4q,lora,qlora", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------
def _proc_status_mib() -> dict[str, float]:
    """VmRSS (current) and VmHWM (peak) of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) / 1024  # kB -> MiB
    return out


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# worker: one method in a fresh process
# ---------------------------------------------------------------------------------------------
def _build(method: str, args, device, dtype):
    """Model with the method's adapter, on ``device``; returns (model, n_trainable)."""

    targets = [t for t in args.targets.split(",") if t]
    if method == "qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from ptqlib.models import resolve_model

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), quantization_config=bnb,
                                                     dtype=dtype, device_map={"": str(device)})
        # no gradient checkpointing: it would change memory for this method only
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    else:
        from ptqlib.models import load_model

        model, _ = load_model(args.model, dtype=dtype, device=str(device))
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
        elif method == "l4q":
            from ptqlib.adapters.l4q import apply_l4q

            apply_l4q(model, bits=args.bits, group_size=args.group_size, rank=args.rank,
                      alpha=args.alpha, target_modules=targets)
        elif method == "qat_lora":
            from ptqlib.adapters.qat_lora import apply_qat_lora

            apply_qat_lora(model, bits=args.bits, group_size=args.group_size, rank=args.rank,
                           alpha=args.alpha, target_modules=targets)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_trainable


def _own_memory(model) -> None:
    """Copy every parameter and buffer into the process's own (anonymous) memory.

    transformers maps safetensors files and keeps weights as views of that mapping: untouched
    fp weights would count in RSS only at the first forward (inflating the training delta),
    and after QLoRA's load-time quantization the still-mapped fp file (pulled in while
    quantizing) would count as model memory although no tensor of the NF4 model needs it.
    """
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):  # tied weights listed once
            if t.device.type == "cpu":
                t.data = t.data.clone()
    gc.collect()  # drops the last references to the mapping, which unmaps it


def worker(args) -> dict:
    import bitsandbytes  # noqa: F401  imported by every worker so the baseline RSS is comparable
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)

    gc.collect()
    rss_before = _proc_status_mib()["VmRSS"]
    t0 = time.perf_counter()
    model, n_trainable = _build(args.worker, args, device, dtype)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    _own_memory(model)
    setup_s = time.perf_counter() - t0

    gc.collect()
    res: dict = {"method": args.worker, "device": str(device), "dtype": dtype_name,
                 "trainable_params": n_trainable, "setup_s": setup_s}
    if device.type == "cuda":
        torch.cuda.synchronize()
        setup_mem = torch.cuda.memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
        res["memory_probe"] = "torch.cuda allocated"
    else:
        setup_mem = _proc_status_mib()["VmRSS"]
        maxrss_setup = _maxrss_mib()
        reset_ok = _reset_peak_rss()
        res["memory_probe"] = "RSS, peak reset after setup" if reset_ok else "ru_maxrss delta (no peak reset)"

    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MIB
        res.update(model_mib=setup_mem, peak_mib=peak, train_delta_mib=peak - setup_mem)
    else:
        peak = _maxrss_mib()
        delta = (peak - setup_mem) if reset_ok else (peak - maxrss_setup)
        res.update(model_mib=setup_mem - rss_before, process_before_load_mib=rss_before,
                   process_peak_rss_mib=peak, train_delta_mib=delta,
                   peak_mib=setup_mem - rss_before + delta)  # model + training, libraries excluded
    timed = times[1:] or times  # the first step pays one-off costs (allocations, lazy init)
    res.update(median_step_s=statistics.median(timed), step_times_s=times,
               tokens_per_s=args.batch * args.seq / statistics.median(timed),
               first_loss=losses[0], last_loss=losses[-1])
    return res


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _run_worker(method: str, argv: list[str]) -> dict:
    # A fixed glibc mmap threshold: without it glibc raises the threshold after the first
    # large free and serves later tensors from the heap, whose freed pages stay in RSS; the
    # peak RSS would then measure allocator history rather than what training needs.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", method],
                          capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"method": method, "error": f"exit {proc.returncode}: {tail}"}


def _table(results: list[dict], args) -> str:
    dev = next((r["device"] for r in results if "device" in r), "?")
    dtype = next((r["dtype"] for r in results if "dtype" in r), "?")
    probe = next((r["memory_probe"] for r in results if "memory_probe" in r), "?")
    cuda = dev.startswith("cuda")
    lines = [
        f"Settings: model `{args.model}`, device {dev}, base dtype {dtype}, batch {args.batch} x {args.seq} "
        f"random tokens, LoRA rank {args.rank} alpha {args.alpha:g}, targets {args.targets}, "
        f"L4Q/QAT-LoRA {args.bits} bits group {args.group_size}, QLoRA NF4 (block 64, double quant), "
        f"AdamW lr {args.lr:g}, no gradient checkpointing, {args.steps} steps (median over steps 2..N), "
        f"one fresh process per method; memory probe: {probe}"
        + ("" if cuda else ", glibc MALLOC_MMAP_THRESHOLD_=128 KiB") + ".",
        "",
        "| method | trainable params | model+adapter memory (MiB) | training delta, peak (MiB) | "
        "model + training peak (MiB) | median step (s) | tokens/s | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        label = LABELS[r["method"]].format(dtype=dtype)
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'].splitlines()[-1][:120]} | | | | | | |")
            continue
        lines.append(
            f"| {label} | {r['trainable_params']:,} | {r['model_mib']:.0f} | {r['train_delta_mib']:.0f} | "
            f"{r['peak_mib']:.0f} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    if not cuda:
        before = [f"{r['process_before_load_mib']:.0f}" for r in results if "process_before_load_mib" in r]
        lines += ["", "CPU: 'model+adapter memory' = RSS after setup minus RSS before loading "
                      f"({'/'.join(before)} MiB of imported libraries, per method); 'training delta' = peak RSS "
                      "during the steps minus RSS after setup; step times on a shared CPU are noisy."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    results = []
    for m in methods:
        print(f"[l4q_memory] running {m} ...", file=sys.stderr, flush=True)
        results.append(_run_worker(m, argv))
    print(_table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
