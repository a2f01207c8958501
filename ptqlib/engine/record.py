"""The record of a stage run: ``runs/<stage-id>/metrics.json``.

The notebook saves what it measured with :func:`save_outputs` (``outputs.json``); the runner
then writes the record — parameters, input ids, metrics, timings, peak memory, versions, git
commit, device, status, error — with :func:`write_json_atomic`, *last*, so a stage whose
``metrics.json`` says ``status: ok`` is finished, and a killed one never looks finished.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ptqlib.files import OUTPUTS, write_json_atomic


def complete(rec: dict | None) -> bool:
    """A finished record as the runner writes it (``stage.execute``): ``status: ok``, the metrics
    and the timings. A valid-JSON but partial record (``{"status": "ok"}``) is not trusted."""
    if not rec or rec.get("status") != "ok" or not isinstance(rec.get("metrics"), dict):
        return False
    t = rec.get("timings")
    return isinstance(t, dict) and isinstance(t.get("wall_s"), (int, float))


def save_outputs(output_dir: str | Path, metrics: dict, **extra) -> Path:
    """Called by a stage notebook: its metrics (flat name -> number) and anything else worth keeping."""
    out = Path(output_dir) / OUTPUTS
    write_json_atomic(out, {"metrics": metrics, **extra, "device": device_info(), "saved_at": time.time()})
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ptqlib", "torch", "transformers", "peft", "bitsandbytes", "papermill", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# The packages whose version moves a stage's numbers (kernels, Trainer, adapter and 4-bit code).
# A stage id hashes parameters, not versions, so a cached stage keeps the numbers of the versions it
# ran under: ``versions_label`` names them in results.csv, and the runner warns when they differ
# from the running environment's.
NUMERIC_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes")


def versions_label(v: dict | None) -> str:
    """``'torch 2.13.0+cpu, transformers 5.25.0, ...'`` from a record's ``versions`` (those of
    ``NUMERIC_PACKAGES`` it has, in that order); ``''`` for a record without versions."""
    return ", ".join(f"{k} {v[k]}" for k in NUMERIC_PACKAGES if k in (v or {}))


def version_changes(recorded: dict | None, current: dict) -> dict[str, tuple[str, str]]:
    """``{package: (recorded, current)}`` for the ``NUMERIC_PACKAGES`` whose version differs."""
    recorded = recorded or {}
    return {k: (recorded[k], current[k]) for k in NUMERIC_PACKAGES
            if k in recorded and k in current and recorded[k] != current[k]}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere ``platform.processor()``): "Intel(R) Xeon(R) ..."
    or "AMD EPYC ...". ``platform.processor()`` alone says only "x86_64" on Linux, which cannot tell the
    AMX machine from a Zen 4, and the same stage id gives different GPTQ codes on the two."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    """Where a stage ran: the CPU model (always: the CPU computes part of every stage), the GPU if any,
    the core count, torch's thread count and the 1-minute load average as the stage ended (above the
    stage's own threads, other work shared the cores: its times are no cost figures)."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    if hasattr(os, "getloadavg"):
        info["load_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info


def busy_cpu(sample_s: float = 0.3) -> str | None:
    """A warning when other work already holds at least half of this machine's cores, None otherwise: a run
    beside it shares the cores, so its stage times are no cost figures, and two processes of several torch
    threads each on few cores slow each other several-fold (docs/parallel.md). Other work is the 1-minute load
    average and, where ``/proc`` tells, the cores busy outside this process and its children over ``sample_s``
    seconds now: the load average lags by a minute, so without that a run started just after another one ended
    (a study stopped and run again) would warn of work that is gone."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < cores / 2:
        return None
    now = others_busy_cores(sample_s)
    if now is not None and now < cores / 2:
        return None
    return (f"the CPU is already busy (1-minute load {load:.1f} on {cores} cores"
            + (f", {now:.1f} cores busy with other work now" if now is not None else "") + "): this run's stages "
            "will share it, so their times are no cost figures, and torch threads of two processes on these cores "
            "slow both several-fold; run studies one after the other (or --jobs N in one runner: docs/parallel.md)")


def others_busy_cores(sample_s: float = 0.3) -> float | None:
    """Cores busy over the next ``sample_s`` seconds with work other than this process and its descendants (a
    zygote importing torch as the run starts), from ``/proc/stat`` and ``/proc/<pid>/stat``; None without them."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        total0, own0 = _busy_jiffies(), _tree_jiffies(os.getpid())
        time.sleep(sample_s)
        total1, own1 = _busy_jiffies(), _tree_jiffies(os.getpid())
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, no sysconf (not Linux)
        return None
    return max(0.0, (total1 - total0) - (own1 - own0)) / hz / sample_s


def _busy_jiffies() -> int:
    """All CPUs' non-idle time so far (user, nice, system, irq, softirq, steal; not idle or iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]


def _tree_jiffies(root: int) -> int:
    """User + system time so far of ``root`` and every live descendant (processes that vanish meanwhile skipped)."""
    parent, spent = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": comm may hold spaces
        except (OSError, IndexError):
            continue
        parent[int(d.name)], spent[int(d.name)] = int(rest[1]), int(rest[11]) + int(rest[12])
    tree, frontier = {root}, [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(kids)
        frontier = kids
    return sum(spent.get(pid, 0) for pid in tree)


def machine_label(device: dict | None) -> str:
    """One line naming the machine of a record's ``device``: ``"AMD EPYC 9R14 (cpu, 2 threads)"`` or
    ``"NVIDIA H200 (cuda; CPU ...)"``; ``"unknown"`` for a record made before devices were recorded."""
    if not device:
        return "unknown"
    cpu = device.get("cpu") or "unknown CPU"
    if device.get("device") == "cuda":
        return f"{device.get('gpu', 'GPU')} (cuda; CPU {cpu})"
    threads = device.get("torch_threads")
    return f"{cpu} (cpu, {threads} threads)" if threads else f"{cpu} (cpu)"


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        # dirty: the library's code differs from the commit (its package, its notebooks); reports and study
        # files being written by the very run that asks are not the code that computed it
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/ptqlib",
                                ":/notebooks"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20
