"""The stage notebooks' parameters cells, generated from the parameter dataclasses (``params``).

Each setting is defined once: its name, type, default and help are the dataclass field and its
comment; the notebook's tagged ``parameters`` cell (what papermill injects over, and
``papermill --help-notebook`` shows) is written from them by ``python -m ptqlib notebooks``, and
``--check`` (run by the tests) fails when a cell differs. Lines of the cell that are no field (the
stage's input, output directory, task, seed; the runner's context) are kept as the notebook has them.
A notebook opened on its own continues the previous one's output (02 reads what 01 wrote): where that needs
another default than the study files' (02's method), the kind's ``explore`` gives it; the batch runner
injects every setting, so a study never sees these defaults.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ptqlib.study.kinds import KINDS
from ptqlib.study.params import field_help


def _literal(v) -> str:
    return json.dumps(v) if isinstance(v, (str, list)) else repr(v)


def field_lines(cls, explore: dict | None = None) -> list[str]:
    """One line per field: ``name: type = default  # help``; ``explore``: the notebook's own defaults where
    they differ from the dataclass's (``StageKind.explore``)."""
    helps = field_help(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (explore or {}).get(f.name, default)
        kind = f.type if isinstance(f.type, str) else f.type.__name__  # a module without postponed annotations
        out.append(f"{f.name}: {kind} = {_literal(default)}  # {helps[f.name]}")
    return out


def _cell(nb: dict) -> dict:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def generated_source(nb: dict, cls, explore: dict | None = None) -> str:
    """The parameters cell of ``nb`` with its field lines written from ``cls`` (its other lines kept, first)."""
    names = {f.name for f in dataclasses.fields(cls)}
    src = "".join(_cell(nb)["source"]).splitlines()
    keep = [ln for ln in src if ln.split(":", 1)[0].strip() not in names and ln.strip()]
    return "\n".join(keep + [""] + field_lines(cls, explore))


def sync(notebooks: str | Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) each stage notebook's parameters cell -> the notebooks that
    differed (with ``check``: that differ now)."""
    changed = []
    for kind in KINDS.values():
        path = Path(notebooks) / kind.notebook
        nb = json.loads(path.read_text())
        want = generated_source(nb, kind.params, kind.explore)
        cell = _cell(nb)
        if "".join(cell["source"]) == want:
            continue
        changed.append(str(path))
        if not check:
            cell["source"] = [ln + "\n" for ln in want.split("\n")[:-1]] + [want.split("\n")[-1]]
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed
