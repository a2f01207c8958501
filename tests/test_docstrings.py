"""The stdlib-docstrings task: real text, split by source document, one cluster per module."""
import ast
import textwrap

import pytest

from ptqlib import docstrings
from ptqlib.data import load_task, task_digest
from ptqlib.text import STDLIB_MODULES

SOURCE = textwrap.dedent('''
    def outer(x):
        """Return the square of x plus one, rounded down."""
        y = x * x
        return y + 1

    class C:
        def method(self, a):
            """Add a to the running total and return it."""
            self.total += a
            return self.total

        def stub(self):
            """Subclasses must implement this hook properly."""
            raise NotImplementedError("later")

        def signature(self, a):
            """signature(a) -> int, the C-style first line."""
            return int(a)

        def short(self):
            """Too short."""
            return 1

    def one_liner(x): """Return x unchanged as it came."""; return x
''')


def test_functions_keep_what_can_be_summarised_in_file_order_without_the_docstring():
    got = docstrings.functions(SOURCE)
    assert [g[0] for g in got] == ["outer", "method"]  # file order; stub, signature, short, one-liner left out
    name, code, summary = got[1]
    assert summary == "Add a to the running total and return it."
    assert code == "def method(self, a):\n    self.total += a\n    return self.total"  # dedented, no docstring
    ast.parse(code)  # still valid Python


def test_a_summary_is_the_first_paragraph_joined():
    src = 'def f(a):\n    """Return the value of a,\n    as read from the file.\n\n    Details here."""\n    return a\n'
    assert docstrings.functions(src)[0][2] == "Return the value of a, as read from the file."


@pytest.fixture(scope="module")
def splits():
    return docstrings.extract()


def test_splits_are_disjoint_by_module_and_big_enough(splits):
    modules = {s: {r["module"] for r in rows} for s, rows in splits.items()}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]
    assert not modules["validation"] & modules["test"]
    assert len(splits["test"]) >= 256 and len(splits["validation"]) >= 256 and len(splits["train"]) >= 512
    for split, ms in modules.items():
        assert all(docstrings.split_of(m) == split for m in ms)
    # the held-out perplexity modules are nobody's training text
    assert not set(STDLIB_MODULES) & set().union(*modules.values())


def test_examples_carry_their_module_as_doc_and_the_first_n_span_the_modules(splits):
    for rows in splits.values():
        doc_of = {}
        for r in rows:
            assert doc_of.setdefault(r["module"], r["doc"]) == r["doc"]  # one doc index per module
        assert len(set(doc_of.values())) == len(doc_of)  # and one module per doc index
        assert max(sum(r["module"] == m for r in rows) for m in doc_of) <= docstrings.PER_MODULE
    n_modules = len({r["module"] for r in splits["test"]})
    assert len({r["module"] for r in splits["test"][:n_modules]}) == n_modules  # round-robin


def test_references_are_the_authors_words_and_not_in_the_prompt(splits):
    rows = splits["test"]
    for r in rows:
        lo, hi = docstrings.SUMMARY_WORDS
        assert lo <= len(r["summary"].split()) <= hi
        assert r["summary"] not in r["code"] and len(r["code"]) <= docstrings.MAX_CODE_CHARS
    assert len({(r["name"], r["summary"]) for s in splits.values() for r in s}) == sum(map(len, splits.values()))


def test_load_task_gives_examples_with_documents_and_a_stable_digest():
    ex = load_task("stdlib-docstrings", "validation", 40)
    assert len(ex) == 40 and all(e.doc >= 0 and e.prompt.startswith(docstrings.INSTRUCTION) for e in ex)
    assert all(e.completion in docstrings.extract()["validation"][i]["summary"] for i, e in enumerate(ex))
    d = task_digest("stdlib-docstrings")
    assert len(d) == 12 and d == docstrings.digest()
    assert task_digest("meetings-hard") is None


def test_the_tasks_content_enters_its_stage_ids(monkeypatch):
    """Another interpreter's standard library is other examples: other finetune and evaluate ids."""
    from ptqlib.study import graph

    args = ("finetune", {"method": "full", "steps": 2}, None, "tiny", "stdlib-docstrings", 0)
    before = graph.stage_id(*args)
    monkeypatch.setattr(graph, "task_digest", lambda task: "0123456789ab")
    assert graph.stage_id(*args) != before
    meetings = ("finetune", {"method": "full", "steps": 2}, None, "tiny", "meetings-hard", 0)
    monkeypatch.undo()
    unchanged = graph.stage_id(*meetings)
    monkeypatch.setattr(graph, "task_digest", lambda task: None)
    assert graph.stage_id(*meetings) == unchanged
