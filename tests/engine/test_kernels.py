"""Stage kernels forked from the pre-loaded zygote: same process isolation, imports already done."""
import os

import nbformat
import papermill as pm
import pytest

from ptqlib.engine import kernels
from ptqlib.engine.stage import kernel_manager_kwargs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc")]


def _run(tmp_path, name, env=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nprint('torch' in sys.modules, os.getppid(), os.getpid(), "
                                          "os.environ.get('PTQLIB_PROBE'))"),
                nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / f"{name}.ipynb"
    nbformat.write(nb, src)
    out = pm.execute_notebook(str(src), str(tmp_path / f"{name}.out.ipynb"), kernel_name="python3",
                              progress_bar=False, **kernel_manager_kwargs(env))
    text = out.cells[0].outputs[0]["text"].split()
    images = sum("image/png" in o.get("data", {}) for o in out.cells[1].outputs)
    assert text[3] == (env or {}).get("PTQLIB_PROBE", "None")  # the stage's own environment reached its kernel
    return text[0] == "True", int(text[1]), int(text[2]), images


def test_kernels_fork_from_the_zygote_and_keep_the_inline_backend(tmp_path, monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    z = kernels.start()
    try:
        preloaded, parent, pid, images = _run(tmp_path, "a")
        assert preloaded and parent == z.proc.pid  # a fork of the zygote, torch already imported
        assert images == 1  # figures still reach the notebook (matplotlib is not pre-imported)
        preloaded2, parent2, pid2, _ = _run(tmp_path, "b", env={"PTQLIB_PROBE": "42"})
        assert parent2 == z.proc.pid and pid2 != pid  # one process per kernel
        # only this user can reach the socket that forks processes: a 0700 directory of its own
        assert os.stat(os.path.dirname(z.path)).st_mode & 0o777 == 0o700
    finally:
        z.close()
    assert kernels.ENV not in os.environ and not os.path.exists(z.path)
    assert not os.path.exists(os.path.dirname(z.path))  # socket, pid file and directory gone


def test_without_a_zygote_kernels_start_normally(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV, str(tmp_path / "no-such.sock"))
    preloaded, parent, _, images = _run(tmp_path, "c", env={"PTQLIB_PROBE": "7"})
    assert not preloaded and parent == os.getpid()  # a new interpreter started by us, nothing pre-imported
    assert images == 1


def test_the_zygote_dies_with_its_runner(tmp_path):
    """A runner killed by SIGKILL leaves no zygote behind (and so no kernels: they exit with it)."""
    import signal
    import subprocess
    import sys
    import time

    runner = subprocess.Popen([sys.executable, "-c", "import time\nfrom ptqlib.engine import kernels\nz = kernels.start()\n"
                               "print(z.proc.pid, z.path, flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, kernels.ENV: ""})
    pid, path = runner.stdout.readline().split()
    deadline = time.time() + 90
    while not os.path.exists(path):  # ready (imports done)
        assert time.time() < deadline, "zygote never became ready"
        time.sleep(0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 30
    while os.path.exists(os.path.dirname(path)):  # the zygote cleans up its socket directory as it goes
        assert time.time() < deadline, "the zygote left its socket directory behind"
        time.sleep(0.2)
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
        assert time.time() < deadline, "the zygote outlived its runner"
        time.sleep(0.2)
