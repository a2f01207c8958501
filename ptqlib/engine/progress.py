"""The runner's progress line: one line per stage (finished / total, elapsed, time left), a tqdm bar on a
terminal and log lines elsewhere."""
from __future__ import annotations

import logging
import re
import sys
import time

from ptqlib.files import RECORD, read_json

log = logging.getLogger("ptqlib.engine.runner")  # the runner's lines, one logger


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per stage: finished / total, elapsed, and an estimate of the time left.

    The estimate sums, over the stages still to run, the recorded wall time of similar stages
    (same model and label up to the seed, from any finished record under runs/), else the mean of this
    run's finished stages of the same kind, else of all kinds. Attached to a terminal it is a
    tqdm bar; otherwise (a log file, CI) plain log lines.
    """

    def __init__(self, runner, todo: list[str], slots: int = 1):  # runner: an engine.runner.Runner
        self.runner, self.todo, self.t0, self.slots = runner, list(todo), time.time(), slots
        self.finished = 0
        self.history: dict[str, list[float]] = {}  # similarity key -> recorded wall seconds
        for d in runner.runs.iterdir() if runner.runs.exists() else []:
            rec = read_json(d / RECORD) if d.is_dir() else None
            wall = ((rec or {}).get("timings") or {}).get("wall_s")
            if (rec or {}).get("status") == "ok" and isinstance(wall, (int, float)) and d.name not in self.todo:
                key = self._key_of(rec.get("kind", ""), rec.get("label", ""), rec.get("model", ""))
                self.history.setdefault(key, []).append(rec["timings"]["wall_s"])
        self.this_run: dict[str, list[float]] = {}
        self.started: dict[str, float] = {}  # running stages -> start time
        self.bar = None
        if sys.stderr.isatty() and self.todo:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.todo), unit="stage", dynamic_ncols=True, file=sys.stderr)

    @staticmethod
    def _key_of(kind: str, label: str, model: str) -> str:
        return f"{kind}:{model}:" + re.sub(r",? seed \d+", "", label)

    def _key(self, sid: str) -> str:
        n = self.runner.nodes[sid]
        return self._key_of(n.kind, n.label(), n.model)

    def estimate(self, sid: str) -> float | None:
        key, kind = self._key(sid), self.runner.nodes[sid].kind
        for pool in (self.this_run.get(key), self.history.get(key),
                     [t for k, v in self.this_run.items() if k.startswith(kind + ":") for t in v],
                     [t for v in self.this_run.values() for t in v]):
            if pool:
                return sum(pool) / len(pool)
        return None

    def left(self) -> str:
        """Estimated time left: the stages still to run, divided over the slots running at once."""
        rest = [self.estimate(s) for s in self.todo]
        known = [t for t in rest if t is not None]
        if not rest:
            return "0m00s"
        if not known:
            return "unknown"
        return ("~" if len(known) == len(rest) else ">=") + _fmt(sum(known) / max(1, min(self.slots, len(rest))))

    def start(self, sid: str) -> None:
        node = self.runner.nodes[sid]
        self.started[sid] = time.time()
        who = ", ".join(node.pipelines[:3]) + (" ..." if len(node.pipelines) > 3 else "")
        msg = (f"[{self.finished + 1}/{self.finished + len(self.todo)}] {node.label()} ({who}) · "
               f"elapsed {_fmt(time.time() - self.t0)} · left {self.left()}")
        if len(self.started) > 1:  # [k/n] is then the next to finish; say how many run alongside
            msg += f" · {len(self.started)} running"
        if self.bar is not None:
            more = f" +{len(self.started) - 1}" if len(self.started) > 1 else ""
            self.bar.set_description_str(f"{node.label()} ({who}){more}")
            self.bar.set_postfix_str(f"left {self.left()}")
        else:
            log.info("%s", msg)

    def done(self, sid: str, ok: bool, by_other: bool = False) -> None:
        wall = time.time() - self.started.pop(sid, time.time())
        if not by_other:
            self.this_run.setdefault(self._key(sid), []).append(wall)
        if sid in self.todo:
            self.todo.remove(sid)
        self.finished += 1
        if self.bar is not None:
            self.bar.update(1)
        elif by_other:
            log.info("   ok %s (finished by another runner)", sid)
        else:
            log.info("   %s %s in %s", "ok" if ok else "FAILED", sid, _fmt(wall))

    def skip(self, sid: str, restart: bool = False) -> None:
        """``sid`` will not run here (``restart``: not now; it stays to do)."""
        self.started.pop(sid, None)
        if sid in self.todo and not restart:
            self.todo.remove(sid)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
