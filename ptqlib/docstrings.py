"""The ``stdlib-docstrings`` task: summarise a function in the words its author chose.

A task of real, human-written text that ships with Python itself, so it runs offline: each example
is one function or method of CPython's standard library (this interpreter's), its docstring taken
out. The prompt asks for the function's one-line docstring summary; the reference is the first
paragraph of the docstring its author wrote (whitespace joined). Scored by ROUGE-L (and exact
match, facts); field F1 does not apply (no fields).

Why this task: it is real text (not generated), its references are per example, and its source
documents are known, so the splits are disjoint *by document*: a module is test when the SHA-1 of
its path is 0 mod 5, validation when 1, else train (the pattern of ``text.pydoc_split``). The
examples of one module are alike (one author, one vocabulary), so each carries its module as its
``doc``: the task's intervals cluster by module, as perplexity's do by document.

Which functions (:func:`extract`): a docstring whose first paragraph has 4-24 words and is not a
signature line (``name(args) -> ...``); a body that does something (not only ``pass``, ``...`` or
``raise NotImplementedError``); code without the docstring of 2 lines to :data:`MAX_CODE_CHARS`
characters. Duplicates (the same name and summary, or the same code: ``_pyio`` copies ``io``'s) keep
their first occurrence in path order. A module gives at most :data:`PER_MODULE` examples (its first,
in file order), so no module dominates a split; a split's examples go round-robin over its modules
(in the order of their hashes), so the first ``n`` of a split span as many modules as they can.
Left out: tests, IDLE, tkinter, lib2to3 and the like (tools and demos, not the library), and the
modules of ``text.STDLIB_MODULES`` (the held-out perplexity source: training on them would lower
``ppl_stdlib``).

The examples depend on the interpreter's standard library: :func:`digest` enters the task's stage
ids (``study.graph.stage_id``), so another Python version's examples never reuse these runs.
CPython's source is under the PSF License Version 2 (docs/models-and-data.md).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import textwrap
from pathlib import Path

TASK = "stdlib-docstrings"
INSTRUCTION = "Write the one-line docstring summary of this Python function.\n\n"
MAX_CODE_CHARS = 600  # ~180 SmolLM2 tokens: the prompt stays about the length of a meetings-hard one
PER_MODULE = 12
SUMMARY_WORDS = (4, 24)
# folders (anywhere in a path) that are tools, demos or tests rather than the library
SKIP_PARTS = frozenset({"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip", "distutils",
                        "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data", "unittest",
                        "venv", "__phello__"})
_SIGNATURE = re.compile(r"^[\w.]+\(")  # "splitquery('/path?query') --> ...": a C-style signature, not a summary


def _module_name(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def split_of(module: str) -> str:
    """The split of a module (a source document): test when its name's SHA-1 is 0 mod 5, validation 1."""
    r = int(hashlib.sha1(module.encode()).hexdigest(), 16) % 5
    return "test" if r == 0 else "validation" if r == 1 else "train"


def _is_stub(body: list[ast.stmt]) -> bool:
    """Only ``pass``, ``...`` or ``raise NotImplementedError``: nothing to summarise."""
    if len(body) != 1:
        return False
    s = body[0]
    if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
        return True
    if isinstance(s, ast.Raise) and s.exc is not None:
        exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _summary(doc: str) -> str | None:
    first = " ".join(doc.strip().split("\n\n")[0].split())
    lo, hi = SUMMARY_WORDS
    if not lo <= len(first.split()) <= hi or _SIGNATURE.match(first):
        return None
    return first


def functions(source: str) -> list[tuple[str, str, str]]:
    """``(name, code without its docstring, summary)`` of every function of ``source`` that qualifies
    (module docstring above), in file order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a file of another Python's grammar (there are none in 3.11's own library)
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        summary = _summary(doc) if doc else None
        ds = node.body[0]
        if summary is None or _is_stub(node.body[1:]) or ds.lineno == node.lineno:
            continue
        kept = lines[node.lineno - 1:ds.lineno - 1] + lines[ds.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        if code.count("\n") >= 1 and len(code) <= MAX_CODE_CHARS:
            out.append((node.lineno, node.name, code, summary))
    return [f[1:] for f in sorted(out)]  # ast.walk is breadth-first: back to file order


def _library_files(root: Path, held_out: tuple[str, ...]) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_PARTS & set(rel.parts[:-1]) or _module_name(rel) in held_out:
            continue
        out.append(rel)
    return out


@functools.lru_cache(maxsize=1)
def extract() -> dict[str, list[dict]]:
    """Split -> examples (dicts: ``module``, ``name``, ``code``, ``summary``, ``doc``: the module's index
    among the split's modules), in the split's round-robin order. Parses the standard library once
    per process (~4 s)."""
    from ptqlib.text import STDLIB_MODULES

    root = Path(sysconfig.get_paths()["stdlib"])
    seen_names, seen_code = set(), set()
    by_module: dict[str, list[dict]] = {}
    for rel in _library_files(root, STDLIB_MODULES):
        module, kept = _module_name(rel), []
        for name, code, summary in functions((root / rel).read_text(encoding="utf-8", errors="replace")):
            if (name, summary) in seen_names or code in seen_code:
                continue
            seen_names.add((name, summary))
            seen_code.add(code)
            kept.append({"module": module, "name": name, "code": code, "summary": summary})
        if kept:
            by_module[module] = kept[:PER_MODULE]
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    order = sorted(by_module, key=lambda m: hashlib.sha1(m.encode()).hexdigest())
    for split, rows in splits.items():
        modules = [m for m in order if split_of(m) == split]
        for k in range(PER_MODULE):  # round-robin: the k-th example of every module, then the k+1-th
            rows.extend({**by_module[m][k], "doc": d} for d, m in enumerate(modules) if k < len(by_module[m]))
    return splits


def prompt(code: str) -> str:
    return f"{INSTRUCTION}```python\n{code}\n```"


@functools.lru_cache(maxsize=1)
def digest() -> str:
    """SHA-256 (12 hex) of every example of every split: the task's content, for stage ids."""
    h = hashlib.sha256()
    for split, rows in sorted(extract().items()):
        for r in rows:
            h.update(f"{split}\0{r['module']}\0{r['code']}\0{r['summary']}\0".encode())
    return h.hexdigest()[:12]
