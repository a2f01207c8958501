import json

import pytest

from ptqlib.data import load_task, meetings, parse_fields, pydoc_split, read_jsonl, sft_features
from ptqlib.errors import ConfigError


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
    train, test = load_task(f"jsonl:{p}", "train", 100), load_task(f"jsonl:{p}", "test", 100)
    assert len(train) == 8 and len(test) == 2
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    with pytest.raises(ConfigError, match="at least 2"):
        p.write_text(json.dumps({"prompt": "q", "completion": "a"}))
        read_jsonl(p)


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
