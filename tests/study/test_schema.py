"""Study-file validation: every bad input fails before any stage runs, naming file, key, value, valid."""
import json
import re
import textwrap

import pytest

from ptqlib.errors import ConfigError
from ptqlib.study.graph import build_graph, stage_id
from ptqlib.study.schema import load_study


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BASE = """
study: t
model: tiny
task: meetings
pipelines:
  base: []
  ft: [{finetune: full}]
  ft_rtn:
    - finetune: full
    - quantize: {method: rtn, bits: [3, 4], group_size: 32}
"""


def test_grid_expansion_and_defaults(tmp_path):
    s = load_study(write(tmp_path, BASE))
    names = [p.name for p in s.pipelines]
    assert names == ["base", "ft", "ft_rtn[bits=3]", "ft_rtn[bits=4]"]
    rtn3 = s.pipelines[2]
    assert [st.kind for st in rtn3.stages] == ["finetune", "quantize", "evaluate"]
    assert rtn3.stages[1].params["bits"] == 3 and rtn3.stages[1].params["group_size"] == 32
    assert rtn3.stages[0].params["steps"] == 40  # dataclass default filled in


def test_seeds_expand_only_training_pipelines(tmp_path):
    s = load_study(write(tmp_path, BASE.replace("task: meetings", "task: meetings\nseeds: [0, 1]")))
    names = [p.name for p in s.pipelines]
    assert "base" in names and "base[seed=1]" not in names  # nothing random in base: one run
    assert {"ft[seed=0]", "ft[seed=1]", "ft_rtn[bits=3,seed=0]", "ft_rtn[bits=4,seed=1]"} <= set(names)


def test_shared_stages_have_one_id(tmp_path):
    s = load_study(write(tmp_path, BASE))
    nodes, chains = build_graph(s)
    ft_ids = {chains[n][0] for n in ("ft", "ft_rtn[bits=3]", "ft_rtn[bits=4]")}
    assert len(ft_ids) == 1  # the fine-tuned model is computed once for three pipelines
    assert len(nodes) == 1 + 2 + 2 * 2  # base eval; ft + eval; 2 x (quantize + eval)
    assert chains["ft_rtn[bits=3]"][1] != chains["ft_rtn[bits=4]"][1]


def test_stage_id_is_content_addressed():
    p = {"method": "rtn", "bits": 4}
    a = stage_id("quantize", p, None, "tiny", "meetings", 0)
    assert a == stage_id("quantize", dict(reversed(list(p.items()))), None, "tiny", "meetings", 0)
    assert a == stage_id("quantize", p, None, "tiny", "other-task", 5)  # PTQ reads neither task nor seed
    assert a != stage_id("quantize", {**p, "bits": 3}, None, "tiny", "meetings", 0)
    assert a != stage_id("quantize", p, "abc", "tiny", "meetings", 0)
    f = stage_id("finetune", {"method": "lora"}, None, "tiny", "meetings", 0)
    assert f != stage_id("finetune", {"method": "lora"}, None, "tiny", "meetings", 1)


@pytest.mark.parametrize("text, expect", [
    ("study: t\nmodel: tiny\npipelnes: {}\n", ["s.yaml", "'pipelnes'", "did you mean 'pipelines'"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: rtn, bitz: 4}}]\n",
     ["s.yaml", "pipelines.a[0].quantize", "'bitz'", "did you mean 'bits'"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: smoothquant}}]\n",
     ["pipelines.a[0].quantize.method", "'smoothquant'", "gptq"]),
    ("model: tiny\npipelines:\n  a: [{finetune: {method: vera}}]\n", ["finetune.method", "'vera'", "qlora"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: nf4, bits: 3}}]\n",
     ["pipelines.a[0].quantize.bits", "3", "'nf4'", "valid: 4"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: gptq, bits: 5}}]\n", ["bits", "5", "2, 3, 4, 8"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: rtn, group_size: 48}}]\n",
     ["pipelines.a[0].quantize.group_size", "48", "does not divide", "q_proj (128)", "valid"]),
    ("model: smollm2-135m\npipelines:\n  a: [{quantize: {method: gptq, group_size: 128}}]\n",
     ["group_size", "128", "576", "'smollm2-135m'"]),
    ("model: gpt5-local\npipelines:\n  a: []\n", ["s.yaml", "model", "'gpt5-local'", "smollm2-135m", "tiny"]),
    ("model: tiny\ntask: jsonl:/nonexistent/x.jsonl\npipelines:\n  a: []\n", ["s.yaml", "task", "not found"]),
    ("model: tiny\ntask: squad\npipelines:\n  a: []\n", ["task", "'squad'", "meetings", "jsonl:"]),
    ("model: tiny\npipelines:\n  a: [{finetune: qlora}]\n", ["pipelines.a[0].finetune.method", "quantize stage before"]),
    ("model: tiny\npipelines:\n  a: [{quantize: nf4}, {finetune: full}]\n", ["pipelines.a[1].finetune.method", "quantized"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: rtn, bits: four}}]\n", ["quantize.bits", "'four'", "int"]),
    ("model: tiny\npipelines:\n  a: [{finetune: lora}, {quantize: rtn}]\n",
     ["pipelines.a[1].quantize", "unmerged 'lora'", "merge: true"]),
    ("model: tiny\npipelines:\n  a: [{evaluate: {}}, {quantize: rtn}]\n", ["pipelines.a[0]", "evaluate can only be the last"]),
    ("model: tiny\npipelines:\n  a: [{evaluate: {runtime: onnx}}]\n", ["runtime: 'onnx'", "valid: torch, llama.cpp"]),
    ("model: tiny\npipelines:\n  a: [{evaluate: {gguf_type: q4_1}}]\n", ["gguf_type", "runtime llama.cpp only"]),
    ("model: tiny\npipelines:\n  a: [{evaluate: {runtime: llama.cpp, gguf_type: q5_k}}]\n",
     ["gguf_type: 'q5_k'", "auto, q4_1, q8_0, f16"]),
    ("model: tiny\npipelines:\n  a: [{prune: {}}]\n", ["unknown stage 'prune'"]),
    ("model: tiny\npipelines:\n  a: []\nclaims: [{claim: x, a: a, b: nope, metric: ppl}]\n", ["claims[0].b", "'nope'"]),
    ("model: tiny\npipelines:\n  a: []\nclaims: [{claim: x, a: a, b: a, metric: ppl, relation: '<'}]\n",
     ["claims[0].relation", "'<'"]),
    ("model: tiny\nseeds: [0, one]\npipelines:\n  a: []\n", ["seeds", "'one'"]),
    ("model: tiny\npipelines:\n  a: []\nclaims: [{claim: x, a: a, b: a, metric: ppl, min_effect: -0.1}]\n",
     ["claims[0].min_effect", "-0.1", ">= 0"]),
    ("model: tiny\npipelines:\n  a: [{quantize: rtn}, {finetune: {method: qlora, base_cache: maybe}}]\n",
     ["base_cache", "'maybe'"]),
    ("model: tiny\npipelines:\n  a: [{finetune: {method: l4q, quantizer_kernel: fast}}]\n",
     ["quantizer_kernel", "'fast'", "auto, compiled, eager"]),
    ("model: tiny\npipelines:\n  a: []\n  b: []\nclaims: [{claim: x, a: a, b: b, metric: ppl, exploratory: maybe}]\n",
     ["claims[0].exploratory", "'maybe'", "true or false"]),
    # QA-* pool over the base's groups: a different group_size is refused, naming both values
    ("model: tiny\npipelines:\n  a: [{quantize: {method: gptq, group_size: 32}}, {finetune: {method: qalora, group_size: 64}}]\n",
     ["pipelines.a[1].finetune.group_size", "64", "base's group_size 32", "set it to 32"]),
    ("model: tiny\npipelines:\n  a: [{quantize: nf4}, {finetune: qablora}]\n",
     ["pipelines.a[1].finetune.method", "'qablora'", "uniform grid", "quantize with method rtn, gptq"]),
    # a key that would be accepted and then ignored is an error
    ("model: tiny\npipelines:\n  a: [{quantize: nf4}, {finetune: {method: qlora, group_size: 32}}]\n",
     ["finetune.group_size", "32", "no effect on method 'qlora'", "l4q, qat_lora, qalora, qablora"]),
    ("model: tiny\ndefaults: {evaluate: {ppl_sources: [pydoc, wiki]}}\npipelines:\n  a: []\n",
     ["ppl_sources", "'wiki'", "valid: pydoc, stdlib"]),
])
def test_bad_input_is_named(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, text))
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


def test_malformed_jsonl_names_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:2: not valid JSON"):
        load_study(write(tmp_path, f"model: tiny\ntask: jsonl:{data}\npipelines:\n  a: []\n"))
    data.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: .*'prompt' and 'completion'"):
        load_study(write(tmp_path, f"model: tiny\ntask: jsonl:{data}\npipelines:\n  a: []\n"))


def test_missing_study_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["smoke", "default", "ptq-qlora", "ptq-qlora-7b", "l4q", "blora"])
def test_shipped_studies_validate(name):
    from pathlib import Path

    # the 7B study's task is a hub dataset: offline, only --dry-run (allow_network=False) accepts it
    s = load_study(Path(__file__).resolve().parents[2] / "parameters" / f"{name}.yaml", allow_network=name != "ptq-qlora-7b")
    assert s.pipelines


def test_7b_study_dry_run_offline(tmp_path, monkeypatch, capsys):
    """The paper's 7B setting validates and prints its graph with no network and no GPU."""
    from pathlib import Path

    from ptqlib.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    study = Path(__file__).resolve().parents[2] / "parameters" / "ptq-qlora-7b.yaml"
    assert main(["run", str(study), "--dry-run", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ft_gptq_qlora[model=mistralai/Mistral-7B-v0.1,seed=1]" in out
    assert "quantize(gptq, 4b, g128)" in out


def test_hub_model_group_size_checked_offline(tmp_path):
    text = "model: meta-llama/Llama-2-7b-hf\npipelines:\n  a: [{quantize: {method: gptq, group_size: 96}}]\n"
    with pytest.raises(ConfigError, match="down_proj \\(11008\\)"):
        load_study(write(tmp_path, text))


def test_qa_group_size_comes_from_the_base(tmp_path):
    """Left out, the QA-* group is the quantized base's; it enters the stage's params (and id)."""
    from ptqlib.study.graph import build_graph

    text = ("model: tiny\npipelines:\n"
            "  g32: [{quantize: {method: rtn, group_size: 32}}, {finetune: qalora}]\n"
            "  g64: [{quantize: {method: rtn, group_size: 64}}, {finetune: qalora}]\n"
            "  same: [{quantize: {method: rtn, group_size: 32}}, {finetune: {method: qablora, group_size: 32}}]\n"
            "  l4q: [{finetune: l4q}]\n")
    s = load_study(write(tmp_path, text))
    by = {p.name: p for p in s.pipelines}
    assert by["g32"].stages[1].params["group_size"] == 32 and by["g64"].stages[1].params["group_size"] == 64
    assert by["same"].stages[1].params["group_size"] == 32
    assert by["l4q"].stages[0].params["group_size"] == 64  # l4q / qat_lora default
    nodes, chains = build_graph(s)
    assert chains["g32"][1] != chains["g64"][1]
    assert "g32" in nodes[chains["g32"][1]].label()


def test_qa_pool_norm_keeps_cached_ids_and_is_refused_where_it_does_nothing(tmp_path):
    """pool_norm: the mean (the code before the key) keeps the ids stages were cached under; the
    sum is a new stage with its own label; a method without a pooled adapter refuses the key."""
    from ptqlib.study.neutral import ID_NEUTRAL

    text = ("model: tiny\ndefaults:\n  finetune: {precision: fp32}\npipelines:\n"  # fp32: as cached before
            "  mean: [{quantize: {method: rtn, group_size: 32}}, {finetune: qalora}]\n"
            "  sum: [{quantize: {method: rtn, group_size: 32}}, {finetune: {method: qalora, pool_norm: sum}}]\n")
    s = load_study(write(tmp_path, text))
    nodes, chains = build_graph(s)
    ft = {p.name: p.stages[1].params for p in s.pipelines}
    assert ft["mean"]["pool_norm"] == "mean" and ft["sum"]["pool_norm"] == "sum"
    before = {k: v for k, v in ft["mean"].items() if k not in ID_NEUTRAL["finetune"]}  # params as cached before
    assert stage_id("finetune", before, chains["mean"][0], "tiny", "meetings", 0) == chains["mean"][1]
    assert chains["sum"][1] != chains["mean"][1]
    assert "sum pool" in nodes[chains["sum"][1]].label() and "pool" not in nodes[chains["mean"][1]].label()
    with pytest.raises(ConfigError, match=r"pool_norm: 'sum' has no effect on method 'lora'; it applies to "
                                          r"qblora, qalora, qablora only"):
        load_study(write(tmp_path, "model: tiny\npipelines:\n  a: [{finetune: {method: lora, pool_norm: sum}}]\n"))
    with pytest.raises(ConfigError, match=r"pool_norm.*'max'.*mean, sum"):
        load_study(write(tmp_path, "model: tiny\npipelines:\n"
                                   "  a: [{quantize: rtn}, {finetune: {method: qalora, pool_norm: max}}]\n"))


def test_dry_run_notes_an_uncached_hub_model(tmp_path, monkeypatch, capsys):
    from ptqlib.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import ptqlib.models as models

    monkeypatch.setattr(models, "model_config", lambda name, allow_network=True: None if not allow_network else
                        pytest.fail("validation of a dry run asked for the network"))
    study = write(tmp_path, "model: someorg/some-model\npipelines:\n  a: [{quantize: {method: gptq, group_size: 96}}]\n")
    assert main(["run", str(study), "--dry-run", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.count("quantize(gptq, 4b, g96)") == 1  # printed once
    assert "note: model 'someorg/some-model' is not in the local cache: it will be fetched at run time" in out


def test_bad_jsonl_is_reported_under_task(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{not json\n")
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, f"model: tiny\ntask: jsonl:{data}\npipelines:\n  a: []\n"))
    assert ": task: " in str(e.value) and ": model: " not in str(e.value)
    assert '{"prompt": "...", "completion": "..."' in str(e.value)  # the expected line format


def test_evaluate_entry_overrides_defaults_and_neutral_keys_keep_stage_ids(tmp_path):
    from ptqlib.study.graph import build_graph

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\ndefaults:\n  evaluate: {ppl_samples: 4, task_samples: 2, precision: fp32, ppl_windows: first,"
                 " generation: generate}\n"
                 "pipelines:\n"
                 "  t: []\n  g: [{evaluate: {runtime: llama.cpp, speed_prompts: 2}}]\n"
                 "  t2: [{evaluate: {runtime: torch, speed_prompts: 0}}]\n"
                 "  loop: [{evaluate: {generation: prefix}}]\n")
    study = load_study(f)
    ev = {p.name: p.stages[-1].params for p in study.pipelines}
    assert ev["g"]["runtime"] == "llama.cpp" and ev["g"]["ppl_samples"] == 4 and ev["g"]["speed_prompts"] == 2
    assert ev["t"]["runtime"] == "torch"
    _, chains = build_graph(study)
    # the new keys at their neutral values leave the id of an existing evaluate stage unchanged
    assert chains["t"] == chains["t2"] != chains["g"]
    assert chains["loop"] != chains["t"]  # ptqlib's greedy loop: other bf16 outputs, so another id
    from ptqlib.study.neutral import ID_NEUTRAL

    before = {k: v for k, v in ev["t"].items() if k not in ID_NEUTRAL["evaluate"]}  # params as cached before
    assert stage_id("evaluate", before, None, "tiny", "meetings", 0) == chains["t"][-1]


def test_grid_rules_change_only_the_ids_of_stages_they_change(tmp_path):
    """sym_grid / group_grid: the old rules keep the ids stages were cached under; the new defaults
    re-run GPTQ with dynamic groups (and symmetric runs) only, not NF4 or asymmetric RTN."""
    from ptqlib.study.graph import build_graph

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n"
                 "  g: [{quantize: {method: gptq}}]\n  g_old: [{quantize: {method: gptq, group_grid: updated}}]\n"
                 "  g_row: [{quantize: {method: gptq, group_size: -1}}]\n"
                 "  g_row_old: [{quantize: {method: gptq, group_size: -1, group_grid: updated}}]\n"
                 "  r: [{quantize: {method: rtn}}]\n  r_max: [{quantize: {method: rtn, sym_grid: max}}]\n"
                 "  rs: [{quantize: {method: rtn, sym: true}}]\n"
                 "  rs_max: [{quantize: {method: rtn, sym: true, sym_grid: max}}]\n"
                 "  n: [{quantize: {method: nf4}}]\n")
    study = load_study(f)
    _, chains = build_graph(study)
    q = {name: c[0] for name, c in chains.items()}
    assert q["g"] != q["g_old"] and q["g_row"] == q["g_row_old"]
    assert q["r"] == q["r_max"] and q["rs"] != q["rs_max"]
    p = next(pl for pl in study.pipelines if pl.name == "g_old").stages[0].params
    before = {k: v for k, v in p.items() if k not in ("sym_grid", "group_grid")}  # as cached before the rules
    assert stage_id("quantize", before, None, "tiny", "meetings", 0) == q["g_old"]
    pn = next(pl for pl in study.pipelines if pl.name == "n").stages[0].params
    assert stage_id("quantize", {k: v for k, v in pn.items() if k not in ("sym_grid", "group_grid")},
                    None, "tiny", "meetings", 0) == q["n"]


@pytest.mark.parametrize("key, bad, valid", [("group_grid", "fresh", "lazy, updated"), ("sym_grid", "half", "full, max")])
def test_grid_rules_are_validated(tmp_path, key, bad, valid):
    with pytest.raises(ConfigError, match=f"{key}: '{bad}' is not valid; valid: {valid}"):
        load_study(write(tmp_path, f"model: tiny\npipelines:\n  a: [{{quantize: {{method: gptq, {key}: {bad}}}}}]\n"))


SELECT = "model: tiny\nseeds: [0, 1]\npipelines:\n  base: []\n  ft: [{finetune: {method: full, lr: %s}}]\n"


@pytest.mark.parametrize("text, expect", [
    ("model: tiny\npipelines:\n  a: [{finetune: {method: full, lrate: {select: [1.0e-4], metric: field_f1}}}]\n",
     ["s.yaml", "pipelines.a[0].finetune", "unknown key 'lrate'", "valid: ", " lr, "]),
    (SELECT % "{select: [], metric: field_f1}", ["s.yaml", "pipelines.ft[0].finetune.lr.select", "[]", "non-empty list"]),
    (SELECT % "{select: 1.0e-4, metric: field_f1}", ["pipelines.ft[0].finetune.lr.select", "0.0001", "non-empty list"]),
    (SELECT % "{select: [1.0e-4, fast], metric: field_f1}", ["finetune.lr.select", "candidate 'fast'", "expected float"]),
    (SELECT % "{select: [1.0e-4, 1.0e-4], metric: field_f1}", ["finetune.lr.select", "0.0001 is listed twice"]),
    (SELECT % "{select: [1.0e-4, -1.0e-3], metric: field_f1}", ["pipelines.ft[0].finetune.lr", "-0.001", "positive"]),
    (SELECT % "{select: [1.0e-4], metric: accuracy}",
     ["pipelines.ft[0].finetune.lr.metric", "'accuracy' is not a metric", "field_f1", "ppl_stdlib", "size_mb_deploy",
      "lmeval.<task>.<metric>"]),
    (SELECT % "{select: [1.0e-4]}", ["finetune.lr.metric", "None is not a metric", "exact_match"]),
    (SELECT % "{select: [1.0e-4], metric: field_f1, by: max}", ["finetune.lr", "'by'", "is not a value",
                                                                "keys: select, metric, tie"]),
    (SELECT % "{select: [1.0e-4], metric: field_f1, tie: -0.01}", ["finetune.lr.tie", "-0.01 is not a margin",
                                                                   "finite number >= 0 in field_f1's units"]),
    (SELECT % "{select: [1.0e-4], metric: field_f1, tie: close}", ["finetune.lr.tie", "'close' is not a margin"]),
    (SELECT % "{select: [1.0e-4], metric: field_f1, tie: .nan}", ["finetune.lr.tie", "nan is not a margin"]),
    (SELECT % "{select: [1.0e-4], metric: field_f1}" + "defaults: {evaluate: {task_samples: 0}}\n",
     ["pipelines.ft[0].finetune.lr.metric", "'field_f1' is not recorded", "task_samples is 0"]),
    (SELECT % "{select: [1.0e-4], metric: ppl_stdlib}" + "defaults: {evaluate: {ppl_sources: [pydoc]}}\n",
     ["'ppl_stdlib' is not recorded", "lack 'stdlib'"]),
    ("model: tiny\npipelines:\n  a: [{finetune: {method: full, target_modules: {select: [[q_proj]], metric: ppl}}}]\n",
     ["pipelines.a[0].finetune.target_modules", "'target_modules' cannot be selected", "valid: steps, lr"]),
    ("model: tiny\npipelines:\n  a: [{finetune: {method: {select: [full, lora], metric: ppl}}}]\n",
     ["pipelines.a[0].finetune.method", "'method' cannot be selected"]),
    ("model: tiny\npipelines:\n  a: [{quantize: {method: gptq, damp: {select: [0.01, 0.1], metric: ppl}}}]\n",
     ["s.yaml", "pipelines.a[0].quantize.damp", "{'select': [0.01, 0.1], 'metric': 'ppl'}", "only finetune settings"]),
    ("model: tiny\npipelines:\n  a: [{evaluate: {task_samples: {select: [4, 8], metric: field_f1}}}]\n",
     ["pipelines.a[0].evaluate.task_samples", "only finetune settings"]),
    ("model: tiny\ndefaults: {quantize: {bits: {select: [3, 4], metric: ppl}}}\npipelines:\n  a: []\n",
     ["defaults.quantize.bits", "only finetune settings"]),
    ("model: tiny\ndefaults: {finetune: {lr: {select: [1.0e-4], metric: f1}}}\npipelines:\n  a: []\n",
     ["defaults.finetune.lr.metric", "'f1' is not a metric", "field_f1"]),
    ("model: tiny\ndefaults: {finetune: {lr: {select: [1.0e-4, 1.0e-3], metric: field_f1}}}\npipelines:\n"
     "  a: [{finetune: {method: full, steps: {select: [4, 8], metric: ppl}}}]\n",
     ["pipelines.a", "selects defaults.finetune.lr (in pipelines.a[0])", "pipelines.a[0].finetune.steps",
      "one select per pipeline"]),
    ("model: tiny\npipelines:\n  a: [{finetune: {method: full, lr: {select: [1.0e-4], metric: ppl}}}, {quantize: nf4},"
     " {finetune: {method: qlora, lr: [1.0e-4, 1.0e-3]}}]\n",
     ["pipelines.a[0].finetune.lr", "also a grid axis of pipelines.a[2]"]),
    ("model: tiny\npipelines:\n  a~select: []\n", ["pipelines.a~select", "'~' is reserved"]),
])
def test_bad_select_is_named(tmp_path, text, expect):
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, text))
    for part in expect:
        assert part in str(e.value), (part, str(e.value))


def test_select_builds_one_validation_pipeline_per_candidate_at_the_first_seed(tmp_path):
    from ptqlib.study.neutral import ID_NEUTRAL

    study = load_study(write(tmp_path, """
        model: tiny
        seeds: [3, 5]
        defaults:
          finetune: {steps: 4, lr: {select: [1.0e-4, 3.0e-4, 1.0e-3], metric: field_f1}}
          evaluate: {task_samples: 4}
        pipelines:
          base: []
          ft: [{finetune: full}]
          ft_rtn: [{finetune: full}, {quantize: {method: rtn, bits: [3, 4], group_size: 32}}]
        """))
    names = [p.name for p in study.pipelines]
    assert names == ["base", "ft~select[lr=0.0001]", "ft~select[lr=0.0003]", "ft~select[lr=0.001]",
                     "ft_rtn~select[lr=0.0001,bits=3]", "ft_rtn~select[lr=0.0003,bits=3]",
                     "ft_rtn~select[lr=0.001,bits=3]", "ft_rtn~select[lr=0.0001,bits=4]",
                     "ft_rtn~select[lr=0.0003,bits=4]", "ft_rtn~select[lr=0.001,bits=4]"]  # test runs wait
    sel_pls = [p for p in study.pipelines if p.family.endswith("~select")]
    assert all(p.seed == 3 for p in sel_pls)  # the study's first seed
    assert all(p.stages[-1].params["split"] == "validation" for p in sel_pls)
    assert [p.stages[0].params["lr"] for p in sel_pls[:3]] == [1e-4, 3e-4, 1e-3]
    assert study.pipelines[0].stages[-1].params["split"] == "test"
    # the evaluate stage differs from the test one in its split only
    ft = study.selections[0]
    val_ev = sel_pls[0].stages[-1].params
    test_ev = ft.options[0][0].stages[-1].params
    # validation measures what ranks the candidates (field_f1: generation only), else as the test-set runs
    assert {k: v for k, v in val_ev.items() if v != test_ev[k]} == {"split": "validation", "ppl_sources": []}
    # what each family selects, per grid point
    assert [(s.family, s.point, s.key, s.metric) for s in study.selections] == [
        ("ft", {}, "lr", "field_f1"), ("ft_rtn", {"bits": 3}, "lr", "field_f1"), ("ft_rtn", {"bits": 4}, "lr", "field_f1")]
    assert ft.candidates == [1e-4, 3e-4, 1e-3] and ft.pipelines == names[1:4] and ft.chosen is None
    # per candidate, the test-set runs: every seed, the test split, the candidate's value, the name without it
    for cand, runs in zip(ft.candidates, ft.options):
        assert [(p.name, p.seed, p.grid) for p in runs] == [("ft[seed=3]", 3, {"seed": 3}), ("ft[seed=5]", 5, {"seed": 5})]
        assert all(p.stages[0].params["lr"] == cand and p.stages[-1].params["split"] == "test" for p in runs)
    # one validation evaluate stage per candidate; the seed-3 training is shared with the test run of its value
    nodes, chains = build_graph(study)
    assert len({chains[n][-1] for n in ft.pipelines}) == 3
    assert nodes[chains[ft.pipelines[0]][-1]].label() == "evaluate(validation)"
    # split: test is ID_NEUTRAL: the test split's evaluate stage ids are the ids cached before the field existed
    assert ID_NEUTRAL["evaluate"]["split"] == "test"
    assert stage_id("evaluate", {k: v for k, v in test_ev.items() if k != "split"}, None, "tiny", "meetings", 0) \
        == stage_id("evaluate", test_ev, None, "tiny", "meetings", 0)


def test_evaluate_split_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="split: 'train' is not valid; valid: test, validation"):
        load_study(write(tmp_path, "model: tiny\npipelines:\n  a: [{evaluate: {split: train}}]\n"))


@pytest.mark.parametrize("body, expect", [
    ("pipelines:\n  a: [{finetune: {method: full, lr: .inf}}]\n", r"lr: inf must be a positive finite number"),
    ("pipelines:\n  a: [{finetune: {method: full, lr: .nan}}]\n", r"lr: nan must be a positive finite number"),
    ("pipelines:\n  a: [{finetune: {method: lora, alpha: .nan}}]\n", r"alpha: nan must be a positive finite number"),
    ("pipelines:\n  a: []\nclaims:\n  - {claim: c, a: a, b: a, metric: ppl, min_effect: .nan}\n",
     r"min_effect: nan must be a number >= 0"),
    ("seeds: [0, 0]\npipelines:\n  a: [{finetune: full}]\n", r"seeds: 0 given twice"),
    ("seeds: []\npipelines:\n  a: [{finetune: full}]\n", r"seeds: an empty list runs nothing"),
    ("seeds: [-1]\npipelines:\n  a: [{finetune: full}]\n", r"seeds: -1 is not an integer >= 0"),
    ("pipelines:\n  a: [{quantize: {method: rtn, bits: [4, 4]}}]\n", r"bits: \[4, 4\] repeats a value"),
    ("pipelines:\n  a: []\nclaims:\n  - {claim: c, a: a, b: a, metric: field_f2}\n",
     r"claims\[0\].metric: 'field_f2' is not a metric a study records; valid: ppl, .*field_f1"),
    ("study: ../../x\npipelines:\n  a: []\n", r"study: '../../x' names the folder reports/<study>/"),
    ("task: 5\npipelines:\n  a: []\n", r"task: 5 is not a task name; valid: meetings"),
])
def test_values_that_would_run_wrong_are_refused(tmp_path, body, expect):
    """Input the fault probe found running to a wrong "ok" (NaN metrics, duplicated rows, a silent
    "no data" claim, a report outside reports/): refused before any stage, naming the value."""
    with pytest.raises(ConfigError, match=expect):
        load_study(write(tmp_path, "model: tiny\n" + body))


def test_duplicate_models_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model: tiny given twice"):
        load_study(write(tmp_path, "model: [tiny, tiny]\npipelines:\n  a: []\n"))


def test_a_study_over_tasks_runs_every_pipeline_on_each_task_with_its_own_ids_and_selection(tmp_path):
    text = ("model: tiny\ntask: [meetings, stdlib-docstrings]\nseeds: [0]\npipelines:\n  base: []\n"
            "  ft: [{finetune: {method: full, lr: {select: [1.0e-4, 1.0e-3], metric: task_score}}}]\n")
    s = load_study(write(tmp_path, text))
    base = [p for p in s.pipelines if p.family == "base"]
    assert [(p.name, p.task) for p in base] == [("base[task=meetings]", "meetings"),
                                                 ("base[task=stdlib-docstrings]", "stdlib-docstrings")]
    nodes, chains = build_graph(s)
    assert chains["base[task=meetings]"] != chains["base[task=stdlib-docstrings]"]  # the task enters the ids
    # one selection per task: each task's own candidates, scored on its own validation split
    assert sorted(sel.point.get("task") for sel in s.selections) == ["meetings", "stdlib-docstrings"]
    one = load_study(write(tmp_path, "model: tiny\ntask: meetings\npipelines:\n  base: []\n", "one.yaml"))
    assert chains["base[task=meetings]"] == build_graph(one)[1]["base"]  # a single task: its ids of before


@pytest.mark.parametrize("tasks, expect", [
    ("[meetings, meetings]", r"task: meetings given twice"),
    ("[]", r"task: an empty list runs nothing"),
    ("[meetings, sales]", r"task: unknown task 'sales'; valid: meetings, meetings-hard, stdlib-docstrings"),
])
def test_bad_task_lists_are_refused(tmp_path, tasks, expect):
    with pytest.raises(ConfigError, match=expect):
        load_study(write(tmp_path, f"model: tiny\ntask: {tasks}\npipelines:\n  a: []\n"))


@pytest.mark.parametrize("task, claim_metric, select_metric, where", [
    ("stdlib-docstrings", "field_f1", "rouge_l", r"claims\[0\]\.metric"),
    ("[meetings, stdlib-docstrings]", "field_f1", "task_score", r"claims\[0\]\.metric"),  # one cell is enough
    ("stdlib-docstrings", "rouge_l", "field_f1", r"the select of ft"),
])
def test_field_f1_is_refused_on_a_task_without_fields(tmp_path, task, claim_metric, select_metric, where):
    def study(claim_metric, select_metric):
        return (f"model: tiny\ntask: {task}\npipelines:\n  base: []\n  ft: [{{finetune: {{method: full, lr: "
                f"{{select: [1.0e-4, 1.0e-3], metric: {select_metric}}}}}}}]\n"
                f"claims:\n  - {{claim: c, a: ft, b: base, metric: {claim_metric}}}\n")

    with pytest.raises(ConfigError, match=where + r": 'field_f1' scores 'field: value' references, which task "
                       r"'stdlib-docstrings' does not have .*valid there: rouge_l, or task_score"):
        load_study(write(tmp_path, study(claim_metric, select_metric)))
    fixed = "task_score" if "," in task else "rouge_l"  # what the message offers
    assert load_study(write(tmp_path, study(*(fixed if m == "field_f1" else m for m in (claim_metric, select_metric))),
                            "ok.yaml")).claims


def test_claim_metrics_of_stages_and_lmeval_are_accepted(tmp_path):
    text = ("model: tiny\npipelines:\n  a: [{finetune: full}]\n  b: []\nclaims:\n"
            "  - {claim: c, a: a, b: b, metric: finetune.train_loss_last}\n"
            "  - {claim: d, a: a, b: b, metric: lmeval.arc_easy.acc}\n  - {claim: e, a: a, b: b, metric: kl_stdlib}\n")
    assert len(load_study(write(tmp_path, text)).claims) == 3


@pytest.mark.parametrize("stage, expect", [
    ("{quantize: {method: gptq, calib_seq_len: 4096}}", r"calib_seq_len: 4096 is more tokens than model 'tiny' has "
                                                        r"positions \(1024\); valid: 1 to 1024"),
    ("{finetune: {method: lora, target_modules: [q_proj, attn_out]}}", r"target_modules: 'attn_out' names no layer "
                                                                      r"of model 'tiny'; valid: q_proj"),
    # the tiny model's k_proj is 128 in, 64 out (2 KV heads x 32): rank 65 has no 65th direction there
    ("{finetune: {method: lora, rank: 65}}", r"a\[0\]\.finetune\.rank: 65 exceeds the smaller side of layer k_proj "
                                            r"\(128 in, 64 out\) of model 'tiny'; valid: 1 to 64"),
    ("[{quantize: nf4}, {finetune: {method: qblora, rank: 300, target_modules: [down_proj]}}]",
     r"rank: 300 exceeds the smaller side of layer down_proj \(256 in, 128 out\) of model 'tiny'; valid: 1 to 128"),
])
def test_settings_the_model_cannot_take_are_refused_before_any_stage(tmp_path, stage, expect):
    with pytest.raises(ConfigError, match=expect):
        load_study(write(tmp_path, f"model: tiny\npipelines:\n  a: {stage if stage.startswith('[') else '[' + stage + ']'}\n"))
    with pytest.raises(ConfigError, match=r"defaults.evaluate.ppl_seq_len: 2048 is more tokens"):
        load_study(write(tmp_path, "model: tiny\ndefaults:\n  evaluate: {ppl_seq_len: 2048}\npipelines:\n  a: []\n"))


# ---- study files that would give a wrong answer with exit 0 (issue 46): refused before any stage ----------
def _study_text(pipelines: str, claims: str = "", name: str = "s") -> str:
    return (f"study: {name}\nmodel: tiny\ntask: meetings\nseeds: [0, 1]\n"
            "defaults:\n  finetune: {steps: 2, batch_size: 2, train_samples: 8}\n"
            f"pipelines:\n{pipelines}" + (f"claims:\n{claims}" if claims else ""))


@pytest.mark.parametrize("pipelines, claims, message", [
    ("  ft: [{finetune: full}]\n  'ft[seed=0]': []\n", "", "their runs would overwrite each other"),
    ("  ft: [{finetune: full}]\n  ft: [{finetune: lora}]\n", "", "key 'ft' is given twice"),
    ("  ft: [{finetune: full}]\n  base: []\n", "  - {claim: x, a: ft, b: ft, metric: field_f1}\n", "a and b are both 'ft'"),
    ("  1: [{finetune: full}]\n  base: []\n", "  - {claim: x, a: '2', b: base, metric: field_f1}\n", "'2' is not a pipeline"),
])
def test_colliding_duplicate_and_self_comparing_studies_are_refused(tmp_path, pipelines, claims, message):
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text(_study_text(pipelines, claims))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_study(f)


def test_an_integer_pipeline_name_works_in_a_claim(tmp_path):
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text(_study_text("  1: [{finetune: full}]\n  base: []\n", "  - {claim: x, a: '1', b: base, metric: field_f1}\n"))
    assert {p.family for p in load_study(f).pipelines} == {"1", "base"}


def test_an_alias_bomb_and_a_long_name_are_refused_at_once(tmp_path):
    import time

    from ptqlib.study.schema import load_study

    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    f = tmp_path / "s.yaml"
    f.write_text(bomb + _study_text("  base: []\n").replace("study: s\n", "description: *i\n"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="anchor &a is not allowed"):
        load_study(f)
    f.write_text(_study_text("  base: []\n", name="x" * 300))
    with pytest.raises(ConfigError, match="a name of 300 characters"):
        load_study(f)
    assert time.perf_counter() - t0 < 5
