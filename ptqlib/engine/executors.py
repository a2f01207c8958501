"""Where stages run: in the runner's process, in local worker processes, or as cluster jobs.

An executor takes a ready stage (its input finished) and returns a handle the runner polls;
every executor ends in :func:`ptqlib.engine.stage.run_stage`, which holds the stage's lock and writes
its record, so the result of a stage does not depend on where it ran.

* ``InlineExecutor`` (``--jobs 1``, the default): one stage at a time in this process.
* ``LocalExecutor`` (``--jobs N``, ``--gpus 0,1``): up to N stages at once, each in its own
  kernel process (driven by a thread of the runner), each given one GPU (``CUDA_VISIBLE_DEVICES``)
  when GPUs are listed, and ``cpu_count // N`` torch threads, so N jobs do not oversubscribe the CPU.
* ``SubmititExecutor`` (``--executor slurm``, or ``local`` for submitit's local executor, which
  runs its real code path minus SLURM): one submitit job per stage, parameters from the study's
  ``executor:`` section. The job id goes to ``runs/.jobs/<id>.json``; a later runner re-attaches
  to a job that is still queued or running instead of submitting the stage again.

Why not papermill's or submitit's own job arrays: stages depend on each other (a quantize stage
needs its fine-tuned input), and a stage is submitted only once its input has a finished record.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptqlib.engine.stage import FAILED, OK, finished, run_stage
from ptqlib.files import read_json, write_json_atomic

log = logging.getLogger("ptqlib.engine.executors")

EXECUTORS = ("local", "slurm", "submitit-local")  # values of run --executor


class Handle:
    """A submitted stage: ``poll()`` is None while it runs, then one of the ``ptqlib.engine.stage`` statuses."""

    where = ""
    error: str | None = None  # why it failed where no record says it (a disk or permission error outside the notebook)

    def poll(self) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


class _Done(Handle):
    def __init__(self, status: str, where: str = "this process"):
        self.status, self.where = status, where

    def poll(self) -> str | None:
        return self.status


@dataclass
class InlineExecutor:
    """One stage at a time, in this process (the stage's kernel is its own process anyway)."""

    runs: Path
    kernel: str | None = None
    progress: bool = False
    slots: int = 1

    def submit(self, node, force: bool = False) -> Handle:
        return _Done(run_stage(self.runs, node, self.kernel, self.progress, force))

    def close(self) -> None:
        pass


class _Thread(Handle):
    def __init__(self, gpu: str | None, release):
        self.gpu, self._release, self.status = gpu, release, None
        self.where = "a runner thread" + (f", GPU {gpu}" if gpu is not None else "")

    def poll(self) -> str | None:
        if self.status is not None and self._release is not None:
            self._release(self.gpu)
            self._release = None
        return self.status


@dataclass
class LocalExecutor:
    """Up to ``jobs`` stages at once on this machine.

    Each stage runs in its own kernel process, driven by a thread of the runner (papermill waits on
    the kernel, so the threads cost nothing; worker interpreters would import papermill and
    nbconvert once per stage). The stage's kernel gets ``CUDA_VISIBLE_DEVICES`` (one GPU of
    ``gpus``) and ``OMP_NUM_THREADS`` (``cpu_count // jobs``) in its own environment.
    """

    runs: Path
    jobs: int = 2
    gpus: list[str] | None = None
    kernel: str | None = None
    progress: bool = False
    threads: int | None = None  # torch threads per job (default: cpu_count // jobs, at least 1)
    _free_gpus: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.gpus is not None:
            if len(set(self.gpus)) != len(self.gpus) or not self.gpus:
                raise ValueError(f"gpus must be distinct device ids, got {self.gpus}")
            self._free_gpus = list(self.gpus)
        if self.threads is None:
            self.threads = max(1, (os.cpu_count() or 1) // self.jobs)

    @property
    def slots(self) -> int:
        return min(self.jobs, len(self.gpus)) if self.gpus else self.jobs

    def _release(self, gpu: str | None) -> None:
        if gpu is not None:
            self._free_gpus.append(gpu)

    def stage_env(self, gpu: str | None) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def submit(self, node, force: bool = False) -> Handle:
        gpu = self._free_gpus.pop(0) if self.gpus else None
        handle = _Thread(gpu, self._release)
        env = self.stage_env(gpu)

        def work() -> None:
            try:
                handle.status = run_stage(self.runs, node, self.kernel, self.progress, force, env)
            except Exception as e:  # noqa: BLE001 — outside the notebook (lock, disk): no record, reported here
                handle.error = f"outside its notebook: {type(e).__name__}: {e}"
                log.error("stage %s failed %s", node.id, handle.error)
                log.debug("stage %s", node.id, exc_info=True)
                handle.status = FAILED

        threading.Thread(target=work, name=f"stage-{node.id}", daemon=True).start()
        return handle

    def close(self) -> None:
        pass


# ---- submitit --------------------------------------------------------------------------------
# keys of a study's `executor:` section -> submitit parameters (slurm_* apply on SLURM only)
SUBMITIT_KEYS = {
    "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
    "time_min": "timeout_min", "gpus": "gpus_per_node", "cpus": "cpus_per_task", "mem_gb": "mem_gb",
    "constraint": "slurm_constraint",
}
_LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "UNKNOWN"}


def submitit_parameters(section: dict[str, Any] | None) -> dict[str, Any]:
    """The study's ``executor:`` section as submitit parameters; an unknown key is an error."""
    section = dict(section or {})
    bad = sorted(set(section) - set(SUBMITIT_KEYS))
    if bad:
        raise ValueError(f"executor: unknown key(s) {', '.join(bad)}; valid: {', '.join(SUBMITIT_KEYS)}")
    return {SUBMITIT_KEYS[k]: v for k, v in section.items()}


def _stage_job(runs: str, node: dict, kernel: str | None, progress: bool, force: bool) -> str:
    """The body of one submitit job (module level: submitit pickles it)."""
    from ptqlib.study.graph import StageNode

    return run_stage(runs, StageNode(**node), kernel, progress, force)


class _Job(Handle):
    def __init__(self, job, runs: Path, sid: str):
        self.job, self.runs, self.sid = job, runs, sid
        self.where = f"job {job.job_id}"

    def poll(self) -> str | None:
        if not self.job.done():
            return None
        (Path(self.runs) / ".jobs" / f"{self.sid}.json").unlink(missing_ok=True)
        try:
            return self.job.result()
        except Exception as e:  # noqa: BLE001 — a crashed / cancelled job: the record decides
            log.error("job %s of stage %s ended without a result: %s", self.job.job_id, self.sid,
                      str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            return OK if finished(self.runs, self.sid) else FAILED


class SubmititExecutor:
    """One submitit job per stage; ``cluster="slurm"`` on a cluster, ``"local"`` on this machine."""

    local = False  # jobs run elsewhere: no pre-loaded kernel process (ptqlib.engine.kernels) for them

    def __init__(self, runs: Path, cluster: str = "slurm", parameters: dict[str, Any] | None = None,
                 kernel: str | None = None, progress: bool = False, slots: int = 64):
        try:
            import submitit
        except ImportError:
            raise RuntimeError("--executor slurm needs submitit: pip install 'ptqlib[cluster]'") from None
        self.submitit, self.runs, self.cluster = submitit, Path(runs), cluster
        self.kernel, self.progress, self.slots = kernel, progress, slots
        self.folder = self.runs / ".jobs" / "submitit"
        self.executor = submitit.AutoExecutor(folder=str(self.folder), cluster=cluster)
        params = {"timeout_min": 24 * 60, **(parameters or {})}
        if cluster != "slurm":  # slurm_* keys mean nothing to the local executor
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(name="ptqlib-stage", **params)

    def _record(self, sid: str) -> Path:
        return self.runs / ".jobs" / f"{sid}.json"

    def attach(self, sid: str) -> Handle | None:
        """A still queued / running job of an earlier runner for this stage, if there is one."""
        info = read_json(self._record(sid))
        if not info or info.get("cluster") != self.cluster:
            return None
        if self.cluster == "slurm":
            job = self.submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
            if job.state not in _LIVE_STATES:
                return None
            return _Job(job, self.runs, sid)
        return None  # a local job dies with the runner that started it: resubmit

    def submit(self, node, force: bool = False) -> Handle:
        from dataclasses import asdict

        attached = None if force else self.attach(node.id)
        if attached is not None:
            log.info("re-attached to %s of stage %s", attached.where, node.id)
            return attached
        job = self.executor.submit(_stage_job, str(self.runs.resolve()), asdict(node), self.kernel,
                                   self.progress, force)
        write_json_atomic(self._record(node.id), {"job_id": job.job_id, "cluster": self.cluster,
                                                  "folder": str(self.folder), "submitted": time.time()})
        return _Job(job, self.runs, node.id)

    def close(self) -> None:
        pass


def make_executor(kind: str, runs: Path, jobs: int | None = None, gpus: list[str] | None = None,
                  kernel: str | None = None, progress: bool = False, section: dict | None = None,
                  threads: int | None = None):
    """The executor for ``run --executor KIND --jobs N --gpus ...``.

    ``jobs``: stages running at once (local default: 1, or one per listed GPU; slurm default: every
    ready stage is submitted). ``threads``: torch threads per local job (default ``cpu_count // jobs``);
    the thread count changes the float summation order, so a run meant to reproduce a serial run's
    records bit for bit gives each job the serial run's count (GPTQ codes flip with it)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if kind not in EXECUTORS:
        raise ValueError(f"executor {kind!r} is not valid; valid: {', '.join(EXECUTORS)}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if kind == "local":
        jobs = jobs or (len(gpus) if gpus else 1)
        if jobs == 1 and not gpus and threads is None:
            return InlineExecutor(runs, kernel, progress)
        return LocalExecutor(runs, jobs, gpus, kernel, progress, threads)
    if threads is not None:  # a cluster job's CPUs come from the study's executor section
        raise ValueError(f"--threads {threads} applies to --executor local only; for {kind!r} set the CPUs per job "
                         "with the study file's executor section (cpus: N)")
    cluster = "slurm" if kind == "slurm" else "local"
    return SubmititExecutor(runs, cluster, submitit_parameters(section), kernel, progress,
                            slots=jobs or (10_000 if cluster == "slurm" else 1))

