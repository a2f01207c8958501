"""Executing one stage: its lock, the notebook through papermill, its record and its HTML page.

Whatever runs a stage (the runner's own process, a local worker process, a SLURM job through
submitit) calls :func:`run_stage`, so a stage's result does not depend on the executor. A stage
runs only under its lock (``runs/.locks/<id>.lock``, an ``flock`` the kernel releases when the
process dies, also on SIGKILL), so two runners or two jobs never run the same stage at once;
its record ``runs/<id>/metrics.json`` is written last and atomically, so a killed stage never
counts as finished.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ptqlib.engine.record import complete, git_commit, versions
from ptqlib.files import (
    OUTPUTS,
    RECORD,
    damaged_weights,
    normalise_modes,
    read_json,
    weight_sizes,
    write_atomic,
    write_json_atomic,
)
from ptqlib.seeding import SCHEME
from ptqlib.study.kinds import KINDS

if TYPE_CHECKING:
    from ptqlib.study.graph import StageNode

log = logging.getLogger("ptqlib.engine.stage")

ROOT = Path(__file__).resolve().parents[2]  # the repository: notebooks/ beside ptqlib/
KERNEL = "ptqlib"

# what run_stage reports
OK, FAILED, BUSY, DONE_ELSEWHERE = "ok", "failed", "busy", "done-elsewhere"


# ---- the per-stage lock -----------------------------------------------------------------------
def lock_path(runs: Path, sid: str) -> Path:
    return Path(runs) / ".locks" / f"{sid}.lock"


@contextlib.contextmanager
def stage_lock(runs: Path, sid: str):
    """Hold the stage's lock (yields True) or, if another process holds it, yield False at once."""
    path = lock_path(runs, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stage_busy(runs: Path, sid: str) -> bool:
    """Is the stage running somewhere right now (its lock held by a live process)?"""
    if not lock_path(runs, sid).exists():
        return False
    with stage_lock(runs, sid) as got:
        return not got


_WARNED: set[str] = set()


def usable(runs: Path, sid: str, rec: dict | None) -> bool:
    """A complete record whose weight files are as it recorded them. A damaged weight file makes the
    stage unfinished (it runs again) with one warning naming the file: otherwise a truncated
    ``model.safetensors`` under an intact record failed a later stage, naming neither."""
    if not complete(rec):
        return False
    if unseeded(rec):
        if sid not in _WARNED:
            _WARNED.add(sid)
            log.warning("stage %s (%s) counts as not finished: its adapter was drawn before adapters were seeded "
                        "from (seed, stage) (ptqlib.seeding); it runs again", sid, rec.get("label", "?"))
        return False
    damaged = damaged_weights(Path(runs) / sid, rec)
    if damaged and sid not in _WARNED:
        _WARNED.add(sid)
        log.warning("stage %s (%s) counts as not finished: %s", sid, rec.get("label", "?"), "; ".join(damaged))
    return not damaged


def unseeded(rec: dict) -> bool:
    """A fine-tuning record of a method that draws its initial adapter, made before that draw was seeded
    from (pipeline seed, stage): its adapter came from the process's RNG state, so it is no result of its id."""
    if rec.get("kind") != "finetune" or rec.get("rng") == SCHEME:
        return False
    from ptqlib.methods import finetune_methods

    method = finetune_methods().get((rec.get("params") or {}).get("method"))
    return method is not None and method.draws_init


def finished(runs: Path, sid: str) -> bool:
    return usable(runs, sid, read_json(Path(runs) / sid / RECORD))


def fresh(runs: Path, node: "StageNode") -> bool:
    """Finished, and from its input as it is now: started after the input's record was written
    (a stage whose input was re-run holds a result of the old input)."""
    rec = read_json(Path(runs) / node.id / RECORD)
    if not usable(runs, node.id, rec):
        return False
    if node.input_id is None:
        return True
    inp = read_json(Path(runs) / node.input_id / RECORD) or {}
    return rec.get("timings", {}).get("started", 0) >= inp.get("timings", {}).get("finished", float("inf"))


# ---- running one stage -------------------------------------------------------------------------
def run_stage(runs: str | Path, node: "StageNode", kernel: str | None = None, progress: bool = False,
              force: bool = False, env: dict | None = None) -> str:
    """Run ``node`` under its lock; returns OK, FAILED, BUSY (running elsewhere, nothing done) or
    DONE_ELSEWHERE (finished from its current input by another runner meanwhile; not re-run
    unless ``force``).
    ``env``: variables set for the stage's kernel only (its GPU, its thread count)."""
    runs = Path(runs)
    with stage_lock(runs, node.id) as got:
        if not got:
            return BUSY
        if not force and fresh(runs, node):
            return DONE_ELSEWHERE
        return OK if execute(runs, node, kernel, progress, env) else FAILED


def input_ref(runs: Path, node: "StageNode") -> str:
    return str((Path(runs) / node.input_id).resolve()) if node.input_id else node.model


def execute(runs: Path, node: "StageNode", kernel: str | None = None, progress: bool = False,
            env: dict | None = None) -> bool:
    """The stage's notebook through papermill, then its page and (last, atomically) its record.
    The caller holds the stage's lock."""
    import papermill as pm

    out = (Path(runs) / node.id).resolve()  # absolute: nothing here may depend on the process's cwd
    if out.exists():  # an unfinished (killed / failed / forced) earlier attempt
        shutil.rmtree(out)
    out.mkdir(parents=True)
    params = {**node.params, "input_model": input_ref(runs, node), "output_dir": str(out.resolve()),
              "task": node.task, "seed": node.seed, "progress": progress}
    if KINDS[node.kind].takes_reference:  # always set: the notebook's own default is for JupyterLab's chain
        with_reference = node.params.get("kl_reference") and node.reference is not None
        params["reference_model"] = ("" if not with_reference else str((Path(runs) / node.reference).resolve())
                                     if node.reference else node.model)
    t0 = time.time()
    error = None
    try:
        with stage_environment(progress):
            pm.execute_notebook(
                str(ROOT / "notebooks" / KINDS[node.kind].notebook), str(out / "notebook.ipynb"), parameters=params,
                # no cwd= here: papermill would os.chdir the whole process, under the other stages'
                # threads; the kernel gets its working directory from the kernel manager instead
                kernel_name=kernel_name(kernel), progress_bar=False, log_output=False,
                **kernel_manager_kwargs(env, cwd=out),
            )
    except Exception as e:  # noqa: BLE001 — any failure of a stage is recorded, never fatal to the study
        error = {"type": type(e).__name__, "message": short_error(e), "traceback": traceback.format_exc()[-4000:]}
    wall = time.time() - t0
    outputs = read_json(out / OUTPUTS)
    if error is None and outputs is None:
        error = {"type": "MissingOutputs", "message": f"the notebook finished without writing {OUTPUTS}"}
    render_html(out, back="../index.html")
    rec = {
        "stage_id": node.id, "kind": node.kind, "label": node.label(), "params": node.params,
        "input": node.input_id, "model": node.model, "task": node.task, "seed": node.seed,
        "pipelines": node.pipelines, "status": "failed" if error else "ok", "error": error,
        "metrics": (outputs or {}).get("metrics", {}), "outputs": {k: v for k, v in (outputs or {}).items() if k != "metrics"},
        "timings": {"wall_s": round(wall, 2), "started": t0, "finished": time.time()},
        "versions": versions(), "git_commit": git_commit(ROOT), "device": (outputs or {}).get("device"),
        "rng": SCHEME,  # how its draws were seeded (ptqlib.seeding): records without it predate the rule
        "weights": weight_sizes(out),  # checked by usable(): a weight file cut short later re-runs the stage
    }
    try:
        normalise_modes(out)
    except OSError as e:  # a mode is not worth losing a computed stage
        log.warning("could not set file modes under %s: %s", out, e)
    write_json_atomic(out / RECORD, rec)  # last: from here on the stage counts as finished
    if error:
        log.error("   FAILED %s: %s", node.id, error["message"])
    return error is None


_KERNEL_CACHE: dict[str, str] = {}


def kernel_name(kernel: str | None = None) -> str:
    """``kernel`` if given, else the project's kernel if registered, else this interpreter's."""
    if kernel:
        return kernel
    if "auto" not in _KERNEL_CACHE:
        from jupyter_client.kernelspec import KernelSpecManager

        specs = KernelSpecManager().find_kernel_specs()
        _KERNEL_CACHE["auto"] = KERNEL if KERNEL in specs else "python3"
        if _KERNEL_CACHE["auto"] != KERNEL:
            log.warning("kernel %r is not registered (make install does it); using 'python3'", KERNEL)
    return _KERNEL_CACHE["auto"]


def render_html(out: Path, name: str = "report.html", exclude_input: bool = False, back: str | None = None) -> None:
    """The executed notebook as HTML: the injected parameters only (the notebook's own defaults
    are dropped, they were overridden), and with ``back`` a link to the study's report."""
    nb_path = out / "notebook.ipynb"
    if not nb_path.exists():
        return
    try:
        import nbformat
        from nbconvert import HTMLExporter

        nb = nbformat.read(nb_path, as_version=4)
        tags = [c.get("metadata", {}).get("tags", []) for c in nb.cells]
        if any("injected-parameters" in t for t in tags):
            nb.cells = [c for c, t in zip(nb.cells, tags) if "parameters" not in t]
        if back:
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"[← back to the study report]({back})"))
        exporter = HTMLExporter()
        exporter.exclude_input = exclude_input
        exporter.exclude_input_prompt = exporter.exclude_output_prompt = exclude_input
        exporter.log.addFilter(_NoAltTextWarning())  # matplotlib figures carry no alt text; not actionable
        body, _ = exporter.from_notebook_node(nb)
        write_atomic(out / name, body)
    except Exception as e:  # noqa: BLE001 — a missing page must not lose a computed stage
        log.warning("could not render %s: %s", nb_path, e)


def short_error(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    # papermill's error text starts with a banner; the informative line is the exception's
    for line in reversed(msg):
        if line.strip() and not set(line.strip()) <= set("-="):
            return line.strip()[:500]
    return type(e).__name__


class _NoAltTextWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Alternative text is missing" not in record.getMessage()


SOCKET_PREFIX = "ptqlib-kernel-"


def remove_stale_sockets(tmp: str | None = None) -> int:
    """Remove the kernels' IPC socket files (``<tmp>/ptqlib-kernel-<pid>-<id>-<n>``) whose owning process is
    gone: a runner killed by SIGKILL cannot clean up after itself. Returns how many were removed."""
    import glob

    removed = 0
    for f in glob.glob(os.path.join(tmp or tempfile.gettempdir(), SOCKET_PREFIX + "*")):
        parts = os.path.basename(f)[len(SOCKET_PREFIX):].split("-")
        if len(parts) != 3 or not parts[0].isdigit():
            continue  # not <pid>-<id>-<n> (an older ptqlib's name: its owner is unknown, so it stays)
        try:
            os.kill(int(parts[0]), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            with contextlib.suppress(OSError):
                os.unlink(f)
                removed += 1
    return removed


def kernel_manager_kwargs(env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Stage kernels talk to the runner over Unix sockets, not TCP: local only, no ports to open,
    and nothing for ipykernel to warn about ("running over TCP without encryption"). ``env`` is
    added to the kernel's environment and ``cwd`` is its working directory (per stage, so
    concurrent stages share neither)."""
    if os.name == "nt":
        return {}
    from jupyter_client import AsyncKernelManager

    extra = dict(env or {})

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            # the pid of the process that owns the sockets: remove_stale_sockets() sweeps those of dead ones
            path = os.path.join(tempfile.gettempdir(), f"{SOCKET_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
            super().__init__(transport="ipc", ip=path, **kw)

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), **extra}
            if cwd is not None:
                kw["cwd"] = str(cwd)
            # a fork of the pre-loaded zygote when there is one (ptqlib.engine.kernels), else a new interpreter
            from ptqlib.engine import kernels

            pid = kernels.spawn(list(kernel_cmd), kw["env"], kw.get("cwd"))
            if pid is None:
                return await super()._async_launch_kernel(kernel_cmd, **kw)
            prov = self.provisioner
            prov.process, prov.pid, prov.pgid = kernels.ForkedProcess(pid), pid, pid
            prov.cwd = kw.get("cwd")
            self._reconcile_connection_info(prov.connection_info)

    return {"kernel_manager_class": IPCKernelManager}


# Warnings that every stage page would show and no reader can act on: tqdm.auto without
# ipywidgets, a transformers deprecation inside peft. Set for the stage kernels only.
_STAGE_WARNINGS = ("ignore:IProgress not found", "ignore:`is_gradient_checkpointing` is deprecated")


_ENV_LOCK = threading.Lock()
_ENV_DEPTH = [0, {}]  # active entries, saved values


@contextlib.contextmanager
def stage_environment(progress: bool):
    """Environment the stage kernels inherit: quiet library progress bars unless asked for.

    Re-entrant and thread-safe (stages running in threads of one runner share it): the first
    entry sets the variables, the last exit restores them."""
    keys = ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS")
    with _ENV_LOCK:
        if _ENV_DEPTH[0] == 0:
            _ENV_DEPTH[1] = {k: os.environ.get(k) for k in keys}
            warnings = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
            os.environ["PYTHONWARNINGS"] = ",".join(warnings + list(_STAGE_WARNINGS))
            if not progress:
                os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # "Loading weights", "Writing model shards"
        _ENV_DEPTH[0] += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _ENV_DEPTH[0] -= 1
            if _ENV_DEPTH[0] == 0:
                for k, v in _ENV_DEPTH[1].items():  # only what this set: other changes to the environment stay
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

