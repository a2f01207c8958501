"""Stage kernels started from a pre-loaded process (a "zygote"), so a stage does not pay the imports.

Every stage notebook runs in a fresh Jupyter kernel, and on a small model most of a stage is the
kernel importing torch, transformers, peft, pandas and matplotlib (5-10 s each time on 2 cores).
The zygote imports them once; each kernel is then a ``fork`` of it running ``ipykernel``, so a
stage still gets a process of its own (isolation, its own memory, SIGKILL-able) without the
import cost. Jupyter has no such launcher (its provisioners start a new interpreter), hence this.

Used when ``PTQLIB_ZYGOTE`` names a running zygote's socket (the runner starts one for a study:
:func:`start`); a kernel spec for another interpreter, a zygote that is not ready, or one that
has initialised CUDA (a forked child cannot use it) fall back to the normal launch.
``PTQLIB_ZYGOTE=off`` disables it; on a machine with NVIDIA devices it is off (CUDA does not survive a
fork of a process that has asked for its devices).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("ptqlib.engine.kernels")

ENV = "PTQLIB_ZYGOTE"
# not matplotlib (nor seaborn): it reads its backend (MPLBACKEND) on import, and the
# kernel must choose its own (the inline backend that puts figures into the stage page)
PRELOAD = ("torch", "transformers", "peft", "pandas", "numpy", "ipykernel.kernelapp",
           "ptqlib.artifacts", "ptqlib.stages.evaluate", "ptqlib.stages.finetune", "ptqlib.stages.quantize", "ptqlib.data",
           "ptqlib.models", "ptqlib.report.analysis")


# ---- the runner side ---------------------------------------------------------------------------
class Zygote:
    """A zygote process and its socket; ``close()`` stops it (its kernels live on until done)."""

    def __init__(self, proc: subprocess.Popen, path: str, previous: str | None):
        self.proc, self.path, self.previous = proc, path, previous

    def close(self) -> None:
        if self.previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self.previous
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        _cleanup(self.path)


def _cleanup(path: str) -> None:
    """Remove the socket, its pid file and their private directory."""
    Path(path).unlink(missing_ok=True)
    Path(path + ".pid").unlink(missing_ok=True)
    Path(path + ".tmp").unlink(missing_ok=True)
    try:
        Path(path).parent.rmdir()
    except OSError:
        pass


def start(env: dict | None = None) -> Zygote | None:
    """Start a zygote in the background and export its socket in ``PTQLIB_ZYGOTE`` (inherited by
    worker processes); None when disabled. Kernels launched before it is ready start normally."""
    if os.environ.get(ENV) == "off" or os.name != "posix" or not os.path.isdir("/proc"):
        return None
    if any(Path("/dev").glob("nvidia[0-9]*")) or os.environ.get("CUDA_VISIBLE_DEVICES"):
        # a library that asks CUDA for its devices at import time makes every fork unable to use
        # CUDA; next to GPU-sized stages the imports hardly matter anyway
        return None
    # the socket lives in a 0700 directory of its own (mkdtemp): only this user can connect, whatever
    # the umask; serve() also checks each peer's uid (SO_PEERCRED), as a fork runs what it is sent
    path = os.path.join(tempfile.mkdtemp(prefix=f"ptqlib-zygote-{os.getpid()}-"), "zygote.sock")
    proc = subprocess.Popen([sys.executable, "-m", "ptqlib.engine.kernels", path], env={**os.environ, **(env or {})},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    Path(path + ".pid").write_text(str(proc.pid))
    previous = os.environ.get(ENV)
    os.environ[ENV] = path
    return Zygote(proc, path, previous)


def spawn(argv: list[str], env: dict, cwd: str | None) -> int | None:
    """Ask the zygote named by ``PTQLIB_ZYGOTE`` to fork a kernel running ``argv``; its pid, or
    None when there is no usable zygote (the caller then launches normally)."""
    path = os.environ.get(ENV)
    if not path or path == "off":
        return None
    deadline = time.time() + 120  # a zygote still importing: waiting costs no more than importing anew
    while not os.path.exists(path):
        if not _alive(path + ".pid") or time.time() > deadline:
            return None
        time.sleep(0.1)
    try:  # python [-X...] -m ipykernel_launcher ARGS: interpreter options (-Xfrozen_modules=off) do not matter
        at = argv.index("ipykernel_launcher")
    except ValueError:
        return None
    if argv[at - 1] != "-m" or not all(a.startswith("-X") for a in argv[1:at - 1]) or \
            os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None  # another interpreter or launcher: the zygote cannot stand in for it
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(json.dumps({"argv": argv[at + 1:], "env": env, "cwd": cwd}).encode() + b"\n")
            reply = json.loads(s.makefile().readline() or "{}")
    except (OSError, ValueError):
        return None
    return reply.get("pid")


def _alive(pid_file: str) -> bool:
    try:
        os.kill(int(Path(pid_file).read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


class ForkedProcess:
    """What jupyter_client's provisioner needs of a ``Popen``, for a kernel forked by the zygote
    (a child of the zygote, which reaps it: liveness is all this process can see)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
                with open(f"/proc/{self.pid}/stat") as f:  # a zombie not yet reaped is gone too
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        self.returncode = 0
            except (ProcessLookupError, FileNotFoundError):
                self.returncode = 0
            except PermissionError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        t0 = time.time()
        while self.poll() is None:
            if timeout is not None and time.time() - t0 > timeout:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---- the zygote ---------------------------------------------------------------------------------
def _child(req: dict) -> None:
    """In the forked child: become the kernel the request describes (never returns)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it; the kernel needs its children's status
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()  # its own process group: the provisioner signals the group
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import warnings

        warnings.resetwarnings()  # as a new interpreter would set them up from PYTHONWARNINGS
        sys.warnoptions[:] = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
        for opt in sys.warnoptions:
            try:
                warnings._setoption(opt)  # type: ignore[attr-defined]
            except warnings._OptionError:  # type: ignore[attr-defined]
                pass
        import torch

        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            torch.set_num_threads(int(threads))
        # exit with the zygote (ipykernel's parent poller), which exits with its runner (serve)
        sys.argv = ["ipykernel_launcher", *req["argv"], f"--IPKernelApp.parent_handle={os.getppid()}"]
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
        code = 0
    finally:
        os._exit(code)


def _peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return struct.unpack("3i", creds)[1]


def serve(path: str) -> None:
    """Import ``PRELOAD``, then fork a kernel for every request on the socket ``path``."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 — a missing optional module is imported by the stage, as before
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return  # a forked child cannot use CUDA set up here: no zygote (kernels start normally)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # kernels are reaped by the OS as they exit
    runner = os.getppid()
    tmp = path + ".tmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(tmp)
        srv.listen(16)
        srv.settimeout(1.0)
        os.replace(tmp, path)  # the socket appears only once the imports are done
        while True:
            if os.getppid() != runner:  # the runner died (even by SIGKILL): so do we, and then our kernels
                _cleanup(path)
                return
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            with conn:
                if _peer_uid(conn) != os.getuid():  # another user: refused (the directory should stop them first)
                    continue
                try:
                    req = json.loads(conn.makefile().readline())
                except ValueError:
                    continue
                pid = os.fork()
                if pid == 0:
                    srv.close()
                    conn.close()
                    _child(req)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1])
