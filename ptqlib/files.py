"""The files of a run directory (``runs/<stage-id>/``): their names, and writing them safely.

Every file is written to a unique temp file beside its target and renamed over it, so a reader, a
full disk or a second writer never leaves or sees half a file. The record (``RECORD``) keeps the
sizes of the weight files, so one cut short later is noticed (:func:`damaged_weights`).
Import-free (no torch): the artifact loader, the engine and the report all read these.
"""
from __future__ import annotations

import json
import os
import tempfile
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
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
