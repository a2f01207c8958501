"""The record of a stage run: ``runs/<stage-id>/metrics.json``.

The notebook saves what it measured with :func:`save_outputs` (``outputs.json``); the runner
then writes the record — parameters, input ids, metrics, timings, peak memory, versions, git
commit, device, status, error — with :func:`write_json_atomic`, *last*, so a stage whose
``metrics.json`` says ``status: ok`` is finished, and a killed one never looks finished.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECORD = "metrics.json"
OUTPUTS = "outputs.json"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a record is as readable as the other outputs
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a unique temp file beside ``path``, then rename it over ``path``: a reader
    (or a full disk, or a second writer) never leaves or sees half a file; the temp goes on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """:func:`write_atomic` of ``src``'s bytes to ``dst``."""
    return write_atomic(dst, Path(src).read_bytes())


def normalise_modes(root: str | Path) -> None:
    """One mode for a run's files: safetensors writes weights 0600 while JSON and pages follow the
    umask; give every file under ``root`` the umask's mode (0644 under umask 022)."""
    mode = 0o666 & ~_umask()
    for f in Path(root).rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_json(path: str | Path) -> dict | None:
    """The JSON object at ``path``, or None when it is missing, truncated, not UTF-8 or not an object:
    one damaged record must not make a runs directory unusable (its stage just runs again)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def complete(rec: dict | None) -> bool:
    """A finished record as the runner writes it (``stage.execute``): ``status: ok``, the metrics
    and the timings. A valid-JSON but partial record (``{"status": "ok"}``) is not trusted."""
    if not rec or rec.get("status") != "ok" or not isinstance(rec.get("metrics"), dict):
        return False
    t = rec.get("timings")
    return isinstance(t, dict) and isinstance(t.get("wall_s"), (int, float))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # the large files a full disk or a copy can cut short


def weight_sizes(run_dir: str | Path) -> dict[str, int]:
    """``{relative path: bytes}`` of the weight files under ``run_dir``: the record keeps them so that a
    weight file cut short after the stage finished (a copy, a sync, a full disk) is noticed by size."""
    root = Path(run_dir)
    return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*"))
            if f.suffix in WEIGHT_SUFFIXES and f.is_file() and not f.is_symlink()}


def damaged_weights(run_dir: str | Path, rec: dict) -> list[str]:
    """The weight files a finished record lists that are now missing or of another size, as
    ``"<path>: <what>"`` (empty: intact, or a record from before sizes were kept)."""
    out = []
    for rel, size in (rec.get("weights") or {}).items():
        f = Path(run_dir) / rel
        try:
            now = f.stat().st_size
        except OSError:
            out.append(f"{f}: missing")
            continue
        if now != size:
            out.append(f"{f}: {now} bytes, the record says {size}")
    return out


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


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
        info["cpu"] = platform.processor() or platform.machine()
    return info


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
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
