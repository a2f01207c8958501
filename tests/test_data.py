import json

import pytest

from ptqlib.data import load_task, meetings, parse_fields, read_jsonl, sft_features
from ptqlib.errors import ConfigError
from ptqlib.text import pydoc_split


def test_pydoc_split_is_deterministic_and_disjoint():
    a_train, a_held = pydoc_split()
    b_train, b_held = pydoc_split()
    assert a_train == b_train and a_held == b_held
    assert not set(a_train) & set(a_held)
    assert 10 <= len(a_held) <= 30 and len(a_train) + len(a_held) > 70


def test_meetings_are_seeded_and_splits_disjoint():
    assert [e.prompt for e in meetings("train", 5)] == [e.prompt for e in meetings("train", 5)]
    train = {e.prompt for e in meetings("train", 300)}
    test = {e.prompt for e in meetings("test", 100)}
    assert not train & test


def test_meeting_answer_is_grounded_in_source():
    for e in meetings("test", 20):
        f = parse_fields(e.completion)
        assert set(f) == {"customer", "product", "quantity", "unit_price", "deadline", "owner", "decision"}
        for k in ("customer", "product", "quantity", "unit_price", "owner"):
            assert f[k] in e.source
        # the list price is a distractor: the answer is the offered price, not the list price
        assert f"${f['unit_price']} per unit" in e.source


def test_jsonl_task_split(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(10)))
    train, val, test = (load_task(f"jsonl:{p}", s, 100) for s in ("train", "validation", "test"))
    assert [e.prompt for e in test] == ["q4", "q9"]  # every 5th line, as before validation existed
    assert [e.prompt for e in val] == ["q1", "q6"]  # carved out of what was train
    assert [e.prompt for e in train] == ["q0", "q2", "q3", "q5", "q7", "q8"]
    assert load_task(f"jsonl:{p}", "validation", 1)[0].prompt == "q1"
    # fewer than 5 lines: train and test as before (the last line is test), no validation split
    p.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(3)))
    assert [e.prompt for e in load_task(f"jsonl:{p}", "train", 9)] == ["q0", "q1"]
    assert [e.prompt for e in load_task(f"jsonl:{p}", "test", 9)] == ["q2"]
    with pytest.raises(ConfigError, match="has 3 examples: a validation split needs at least 5"):
        load_task(f"jsonl:{p}", "validation", 9)
    with pytest.raises(ConfigError, match="at least 2"):
        p.write_text(json.dumps({"prompt": "q", "completion": "a"}))
        read_jsonl(p)


# sha256 of the first 64 examples of each split as generated before the validation split existed
# (ptqlib.data at 026b108): adding validation must leave train and test, and so every cached
# stage and reported number, exactly as they were
BEFORE_VALIDATION = {("meetings", "train"): "98f292d755559cc5", ("meetings", "test"): "ea6afbccc4e82680",
                     ("meetings-hard", "train"): "98cc1c3d7cc532b6", ("meetings-hard", "test"): "f821eb7eda440d42"}


@pytest.mark.parametrize("task", ["meetings", "meetings-hard"])
def test_generated_tasks_have_a_disjoint_validation_split_and_unchanged_train_test(task):
    import hashlib

    for split in ("train", "test"):
        ex = load_task(task, split, 64)
        digest = hashlib.sha256("\n\n".join(e.prompt + "\n->\n" + e.completion for e in ex).encode()).hexdigest()[:16]
        assert digest == BEFORE_VALIDATION[(task, split)], split
    prompts = {s: [e.prompt for e in load_task(task, s, n)] for s, n in (("train", 512), ("validation", 128),
                                                                          ("test", 128))}
    assert len(set(prompts["validation"])) == 128  # distinct examples
    assert prompts["validation"] == [e.prompt for e in load_task(task, "validation", 128)]  # deterministic
    for a, b in (("train", "validation"), ("validation", "test"), ("train", "test")):
        assert not set(prompts[a]) & set(prompts[b]), (a, b)


def test_hub_task_splits_by_row(monkeypatch):
    """hf: test is every 10th row from 0 (as before), validation every 10th from 5, train the rest."""
    import sys
    import types

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]

    class FakeDataset(list):
        column_names = ["instruction", "output"]

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, cfg=None, split=None: FakeDataset(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr("ptqlib.data._hf_cached", lambda name: True)  # as if in the local cache
    got = {s: [e.prompt for e in load_task("hf:some/set", s, 100)] for s in ("train", "validation", "test")}
    assert got["test"] == ["q0", "q10", "q20"] and got["validation"] == ["q5", "q15", "q25"]
    assert len(got["train"]) == 24 and not set(got["train"]) & (set(got["test"]) | set(got["validation"]))


@pytest.mark.parametrize("offline", [True, False])
def test_an_uncached_hub_task_is_refused_at_once_where_the_hub_is_off_or_unreachable(tmp_path, monkeypatch, offline):
    """It was accepted, then retried for 58-104 s after the first stages ran."""
    import time

    from ptqlib.study.schema import load_study

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("ptqlib.hub.hub_reachable", lambda: False)  # unreachable either way: no retry may start
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\ntask: hf:nobody/no-such-set\npipelines:\n  base: []\n")
    t0 = time.perf_counter()
    why = "HF_HUB_OFFLINE" if offline else r"huggingface\.co:443\) cannot be reached"
    with pytest.raises(ConfigError, match=rf"task 'hf:nobody/no-such-set': the dataset is not in the local cache .*{why}"):
        load_study(f)
    assert time.perf_counter() - t0 < 5


def test_load_task_refuses_an_unknown_split():
    with pytest.raises(ConfigError, match="split: 'dev' is not a task split; valid: train, validation, test"):
        load_task("meetings", "dev", 4)


def test_sft_features_mask_the_prompt():
    from ptqlib.models import load_tokenizer

    tok = load_tokenizer("tiny")
    ex = meetings("train", 3)
    for f, e in zip(sft_features(tok, ex, 512), ex):
        labels = [t for t in f["labels"] if t != -100]
        n_prompt = f["labels"].count(-100)
        assert f["input_ids"][n_prompt:] == labels  # loss only on the trailing answer
        assert tok.decode(labels, skip_special_tokens=True).strip() == e.completion
    short = sft_features(tok, ex[:1], 40)[0]  # too long: the prompt is cut, the answer kept
    assert len(short["input_ids"]) == 40 and short["labels"][-1] != -100


def test_meetings_hard_answer_is_the_last_agreed_value():
    import re

    exs = meetings("test", 200, hard=True)
    assert [e.prompt for e in exs[:5]] == [e.prompt for e in meetings("test", 5, hard=True)]  # seeded
    assert not {e.prompt for e in exs} & {e.prompt for e in meetings("test", 200)}  # not the easy task
    changed = 0
    for e in exs:
        f = parse_fields(e.completion)
        assert set(f) == {"customer", "product", "quantity", "unit_price", "deadline", "owner", "decision"}
        for k in ("customer", "product", "quantity", "unit_price", "deadline", "owner"):
            assert f[k] in e.source, (k, f[k])
        src = e.source
        prices = re.findall(r"(?:offer|now,) \$(\d+) per unit", src)
        assert f["unit_price"] == prices[-1]  # the last concession, not the list price or the first offer
        qty = re.findall(r"make that (\d+) units", src)
        if qty:
            assert f["quantity"] == qty[-1]
        if "Actually, I will take it" in src:
            assert src.splitlines()[-1].startswith(f["owner"] + ":")
        if "Yes, agreed" in src:
            assert f"move it to {f['deadline']}?" in src
        if "No, the date stays" in src:
            assert f"Delivery by {f['deadline']}." in src
        changed += bool(qty or len(prices) > 1 or "Actually" in src or "move it to" in src)
    assert changed > 150  # most calls revise at least one field


def test_load_task_knows_meetings_hard():
    assert load_task("meetings-hard", "train", 3)[0].prompt == meetings("train", 1, hard=True)[0].prompt


def test_stdlib_windows_are_held_out_code():
    from ptqlib.models import load_tokenizer
    from ptqlib.text import text_windows

    tok = load_tokenizer("tiny")
    a = text_windows(tok, "test", 64, 8, source="stdlib")
    assert a.shape == (8, 64) and (a == text_windows(tok, "test", 64, 8, source="stdlib", seed=3)).all()
    assert not (a == text_windows(tok, "test", 64, 8, source="pydoc")).all()
    assert tok.decode(a.flatten().tolist()).startswith("# file: argparse.py")
    assert "def " in tok.decode(text_windows(tok, "test", 64, 64, source="stdlib").flatten().tolist())
    with pytest.raises(ConfigError, match="held-out text only"):
        text_windows(tok, "train", 64, 8, source="stdlib")
    with pytest.raises(ConfigError, match="'wiki'.*pydoc, stdlib"):
        text_windows(tok, "test", 64, 8, source="wiki")


def test_random_windows_span_the_held_out_documents():
    """ppl_windows random: non-overlapping, seeded, from many topics / modules (not the first pages),
    each window tagged with its document; first: the consecutive windows of before."""
    from ptqlib.models import load_tokenizer
    from ptqlib.text import STDLIB_MODULES, held_out_windows, text_windows

    tok = load_tokenizer("tiny")
    for source, n_docs in (("stdlib", len(STDLIB_MODULES)), ("pydoc", 19)):
        w, docs = held_out_windows(tok, source, 64, 32)
        assert w.shape == (32, 64) and len(docs) == 32
        w2, docs2 = held_out_windows(tok, source, 64, 32)
        assert (w == w2).all() and docs == docs2  # every pipeline scores the same tokens
        assert len(set(docs)) >= n_docs // 2 and max(docs) > n_docs // 2, docs  # the whole domain, not its start
        assert docs == sorted(docs)  # in text order
        rows = {tuple(r) for r in w.tolist()}
        assert len(rows) == 32  # distinct (non-overlapping slots)
        first, fdocs = held_out_windows(tok, source, 64, 32, layout="first")
        assert (first == text_windows(tok, "test", 64, 32, source=source)).all() and set(fdocs) == {-1}
    assert not (held_out_windows(tok, "pydoc", 64, 8, seed=1)[0] == held_out_windows(tok, "pydoc", 64, 8)[0]).all()
    with pytest.raises(ConfigError, match=r"ppl_windows: 'middle' is not a layout; valid: random, first"):
        held_out_windows(tok, "pydoc", 64, 8, layout="middle")
    with pytest.raises(ConfigError, match=r"only \d+ windows of 64 tokens; asked for 100000"):
        held_out_windows(tok, "pydoc", 64, 100000)


def test_jsonl_with_an_empty_completion_or_bad_bytes_is_refused(tmp_path):
    from ptqlib.data import read_jsonl

    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": " "}\n')
    with pytest.raises(ConfigError, match=r"t.jsonl:2: empty completion"):
        read_jsonl(f)
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "d"}\n')
    with pytest.raises(ConfigError, match=r"t.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        read_jsonl(f)


@pytest.mark.parametrize("source, seq_len, layout", [("pydoc", 256, "random"), ("stdlib", 64, "random"),
                                                     ("pydoc", 128, "first")])
def test_held_out_capacity_is_exactly_what_the_windows_can_give(tmp_path, monkeypatch, source, seq_len, layout):
    """The count load_study checks ppl_samples against is the one the evaluate stage meets: n windows work,
    n + 1 are refused; a second process reads it from the cache file without a tokenizer."""
    from ptqlib import models, text
    from ptqlib.models import load_tokenizer, resolve_model

    model_dirs = resolve_model("tiny").parent
    monkeypatch.setenv("PTQLIB_CACHE", str(tmp_path))  # a cache file of its own, the model shared
    monkeypatch.setattr(models, "_CAPACITY", {})
    (tmp_path / "models").symlink_to(model_dirs)
    n = models.held_out_capacity("tiny", source, seq_len, layout)
    tok = load_tokenizer("tiny")
    assert text.held_out_windows(tok, source, seq_len, n, layout)[0].shape == (n, seq_len)
    with pytest.raises(ConfigError, match=f"only {n} windows"):
        text.held_out_windows(tok, source, seq_len, n + 1, layout)
    assert (tmp_path / "held-out-windows.json").exists()
    monkeypatch.setattr(models, "_CAPACITY", {})
    monkeypatch.setattr(text, "window_capacity", lambda *a: pytest.fail("counted again"))
    assert models.held_out_capacity("tiny", source, seq_len, layout) == n


def test_ppl_samples_beyond_the_held_out_text_are_refused_at_load(tmp_path):
    from ptqlib.models import held_out_capacity, resolve_model
    from ptqlib.study.schema import load_study

    resolve_model("tiny")  # the check needs the tokenizer on the machine
    most = held_out_capacity("tiny", "stdlib", 128, "random")
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  base: []\ndefaults:\n"
                 f"  evaluate: {{ppl_samples: {most + 1}, ppl_seq_len: 128, ppl_sources: [stdlib]}}\n")
    with pytest.raises(ConfigError, match=rf"s.yaml: defaults.evaluate.ppl_samples: {most + 1} windows of 128 tokens "
                                          rf"is more than the held-out stdlib text gives model 'tiny' \({most}\); "
                                          rf"valid: 0 to {most}"):
        load_study(f)
    f.write_text(f.read_text().replace(f"ppl_samples: {most + 1}", f"ppl_samples: {most}"))
    load_study(f)


class _BosTokenizer:
    """tiny's tokenizer made to put a BOS before every text, as Gemma's does."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=True, **kw):
        out = self.tok(text, add_special_tokens=False, **kw)
        return {"input_ids": ([1] if add_special_tokens else []) + out["input_ids"]}


def test_windows_start_with_the_bos_a_tokenizer_puts_before_every_text():
    """Held-out and calibration windows of a BOS tokenizer (Gemma) begin with it and keep their length, the rest
    of each window the plain one's tokens; a tokenizer without one (SmolLM2, tiny) gets its windows unchanged."""
    import torch

    from ptqlib.models import load_tokenizer, resolve_model
    from ptqlib.text import held_out_windows, leading_bos, text_windows

    tok = load_tokenizer(resolve_model("tiny"))
    bos = _BosTokenizer(tok)
    assert leading_bos(tok) is None and leading_bos(bos) == 1
    for make in (lambda t: held_out_windows(t, "pydoc", 64, 4, seed=0)[0], lambda t: text_windows(t, "train", 64, 4, 3),
                 lambda t: held_out_windows(t, "stdlib", 32, 3, layout="first")[0]):
        plain, with_bos = make(tok), make(bos)
        assert with_bos.shape == plain.shape
        assert torch.equal(with_bos[:, 0], torch.ones(len(plain), dtype=torch.long))
        assert torch.equal(with_bos[:, 1:], plain[:, :-1])
