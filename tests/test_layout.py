"""The package's layout holds: no import cycle, no import from a higher layer, no torch to read a study.

Layers, lowest first (a module imports its own layer or lower):

0. ``errors``, ``files``, ``hub``, ``seeding``: no ptqlib imports of note
1. the numerics and their I/O: ``metrics``, ``precision``, ``text``, ``data``, ``models``, ``tiny``, ``artifacts``,
   ``quant/``, ``adapters/``, ``methods/``, ``deploy/``
2. ``study/``: parameters, schema, selection, graph
3. ``engine/``: records, stage execution, executors, runner
4. ``stages/`` (the notebooks' bodies) and ``report/``
5. ``cli``, ``__main__``, the package itself

Imports inside functions count (they run), and so do imports under ``if TYPE_CHECKING:`` (they are
arrows of the design too), with no exception: a method annotates the settings it receives with
``ptqlib.methods.StageSettings``, a protocol of its own layer, not with the study layer's dataclasses.
"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ptqlib"
LAYERS = [
    ["ptqlib.errors", "ptqlib.files", "ptqlib.hub", "ptqlib.seeding"],
    ["ptqlib.metrics", "ptqlib.relations", "ptqlib.precision", "ptqlib.text", "ptqlib.data", "ptqlib.docstrings",
     "ptqlib.models",
     "ptqlib.tiny", "ptqlib.artifacts", "ptqlib.quant", "ptqlib.adapters", "ptqlib.methods", "ptqlib.deploy"],
    ["ptqlib.study"],
    ["ptqlib.engine"],
    ["ptqlib.stages", "ptqlib.report"],
    ["ptqlib.cli", "ptqlib.__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = f
    return out


def _layer(mod: str) -> int:
    if mod == "ptqlib":  # the package's __init__: the top
        return len(LAYERS) - 1
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{mod} is in no layer of tests/test_layout.py: add it"
    return best[0]


def _imports(mods: dict[str, Path], type_only: bool = False) -> dict[str, set[str]]:
    """module -> the ptqlib modules it imports: outside ``if TYPE_CHECKING:`` blocks, or (``type_only``)
    inside them."""
    graph = {}
    for mod, f in mods.items():
        tree = ast.parse(f.read_text())
        typing_ids = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                      and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps = set()
        for n in ast.walk(tree):
            if (id(n) in typing_ids) != type_only:
                continue
            if isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name.startswith("ptqlib")}
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:  # relative: from .x import y
                    pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
                    for _ in range(n.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                if not base.startswith("ptqlib"):
                    continue
                for a in n.names:  # from ptqlib.report import tables: the module tables
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def test_no_module_imports_a_higher_layer():
    mods = _modules()
    up = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
          for m, deps in _imports(mods).items() for d in sorted(deps) if _layer(d) > _layer(m)]
    up += [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)}) for its annotations"
           for m, deps in _imports(mods, type_only=True).items() for d in sorted(deps)
           if _layer(d) > _layer(m)]
    assert not up, "\n".join(up)


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    runtime, typing = _imports(mods), _imports(mods, type_only=True)
    graph = {m: runtime[m] | typing[m] for m in mods}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The test above can fail: an engine module importing the report is caught."""
    mods = {"ptqlib.engine.x": tmp_path / "x.py", "ptqlib.report.tables": tmp_path / "t.py"}
    mods["ptqlib.engine.x"].write_text("def f():\n    from ptqlib.report import tables\n")
    mods["ptqlib.report.tables"].write_text("")
    graph = _imports(mods)
    assert graph["ptqlib.engine.x"] == {"ptqlib.report.tables"}
    assert _layer("ptqlib.report.tables") > _layer("ptqlib.engine.x")
    mods["ptqlib.engine.x"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from ptqlib.report import tables\n")
    assert _imports(mods)["ptqlib.engine.x"] == set()
    assert _imports(mods, type_only=True)["ptqlib.engine.x"] == {"ptqlib.report.tables"}  # an arrow too


def test_reading_a_study_imports_no_torch():
    """``--dry-run`` and validation stay fast: the study layer and its graph need no torch."""
    code = ("import sys\nfrom ptqlib.study.schema import load_study\nfrom ptqlib.study.graph import build_graph\n"
            f"build_graph(load_study({str(PKG.parent / 'parameters' / 'default.yaml')!r}))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_module_is_longer_than_400_lines():
    long = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > 400}
    assert not long, long


def test_the_architecture_docs_layer_table_is_the_one_tested():
    """docs/architecture.md's layer table names the same modules per layer as LAYERS (which the tests above
    check against the import graph), so the doc cannot drift from the code."""
    import re

    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d) \| ([^|]+) \|", doc, re.M)
    table = {int(n): {"ptqlib." + m.rstrip("/") for m in re.findall(r"`([\w/]+)`", mods)} for n, mods in rows}
    assert table == {i: set(layer) for i, layer in enumerate(LAYERS)}


# the numerics kept whole, each one algorithm read top to bottom with the paper's notation (docs/architecture.md)
LONG_NUMERICS = {("ptqlib/quant/gptq.py", "quantize"), ("ptqlib/quant/gptq_model.py", "gptq_quantize_model")}


def test_no_function_is_longer_than_60_lines_outside_the_named_numerics():
    long = []
    for f in sorted(PKG.rglob("*.py")):
        rel = str(f.relative_to(PKG.parent))
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60 \
                    and (rel, n.name) not in LONG_NUMERICS:
                long.append(f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_the_tests_mirror_the_package():
    """Each test folder is a package of ptqlib (besides integration/ and data/), and each package with tests
    has its folder: the tests of ptqlib/<pkg>/ live in tests/<pkg>/."""
    tests = PKG.parent / "tests"
    folders = {d.name for d in tests.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))}
    packages = {d.name for d in PKG.iterdir() if (d / "__init__.py").exists()}
    assert folders - {"integration", "data"} <= packages, folders - packages
    assert {"study", "engine", "stages", "report", "quant", "adapters", "methods", "deploy"} <= folders


# The packages that may name a method: the registry's own modules, and the numerics they call, each module
# named for its algorithm (quant/gptq.py, adapters/balanced.py; quant/checkpoint.py writes the "gptq" format).
NAMES_METHODS = ("methods", "quant", "adapters")


def _method_names_in(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) for each string constant of ``source`` that is or contains a method name as a word,
    docstrings aside ("full" only as a whole string: it is an English word too)."""
    tree = ast.parse(source)
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    hits = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            hits += [(n.lineno, m) for m in sorted(names) if n.value == m or (
                m != "full" and re.search(rf"(?<![\w/.-]){re.escape(m)}(?![\w/-])", n.value))]
    return hits


def _registered_names() -> set[str]:
    from ptqlib.methods import finetune_methods, quantize_methods

    return set(quantize_methods()) | set(finetune_methods())


def test_no_code_outside_the_methods_names_a_method():
    """A method's knowledge lives in its module (issue 45): no other code branches on, defaults to or spells
    a method's name; the notebooks' code cells neither (their parameters cells are generated from the
    dataclasses, whose defaults come from ``ptqlib.methods``)."""
    names = _registered_names()
    found = [f"{path.relative_to(PKG.parent)}:{line}: {name}" for path in sorted(PKG.rglob("*.py"))
             if path.relative_to(PKG).parts[0] not in NAMES_METHODS
             for line, name in _method_names_in(path.read_text(), names)]
    for nb in sorted((PKG.parent / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] == "code" and "parameters" not in cell.get("metadata", {}).get("tags", []):
                src = "".join(cell["source"])
                found += [f"{nb.name} cell {i}: {name}" for name in sorted(names) if name != "full"
                          and re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w/-])", src)]
    assert not found, found


def test_the_method_name_check_sees_a_branch_a_default_and_a_message():
    names = _registered_names()
    src = ('"""Docstrings may say gptq."""\n'
           'def f(p):\n    """Or qlora."""\n    if p.method == "gptq":\n        return "a full run"\n'
           '    x = {"method": "nf4"}\n    raise ValueError(f"try {x} or eora instead")\n')
    assert _method_names_in(src, names) == [(4, "gptq"), (6, "nf4"), (7, "eora")]
