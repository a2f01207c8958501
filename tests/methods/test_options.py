"""A method declares its own settings (``ptqlib.methods.Options``): adding one with a new setting is its
module only; the study file takes the setting, the stage of another method refuses it, the ids of the
other methods' stages do not change, and the notebook's parameters cell documents it."""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptqlib import methods
from ptqlib.errors import ConfigError, check_positive
from ptqlib.methods import Options, QuantizeMethod
from ptqlib.study import cells
from ptqlib.study.graph import build_graph
from ptqlib.study.kinds import KINDS
from ptqlib.study.params import FinetuneSettings, QuantizeSettings, field_help, params_class
from ptqlib.study.schema import load_study

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LevelsOptions(Options):
    levels: int = 15  # toy: grid levels per weight

    def __post_init__(self) -> None:
        check_positive("levels", self.levels)


def _toy_quantize(*a, **k):
    raise AssertionError("not run here")


@pytest.fixture
def toy():
    """A quantize method with a setting no other method has, registered for one test."""
    methods.load_all()  # the built-in methods first, as for a module named in PTQLIB_METHODS
    entry = QuantizeMethod("toy", "a toy grid", (4,), "uniform", _toy_quantize, _toy_quantize, options=LevelsOptions)
    methods.register(entry)
    yield entry
    methods.QUANTIZE.pop("toy")


STUDY = """
study: opts
model: tiny
task: meetings
defaults:
  quantize: {{group_size: 32{defaults}}}
  evaluate: {{ppl_samples: 2, ppl_seq_len: 32, task_samples: 2, max_new_tokens: 4, batch_size: 2}}
pipelines:
  gptq: [{{quantize: {{method: gptq, calib_samples: 4}}}}]
{extra}
"""


def _study(tmp_path, defaults="", extra=""):
    f = tmp_path / "opts.yaml"
    f.write_text(STUDY.format(defaults=defaults, extra=extra))
    return load_study(f, allow_network=False)


def _ids(study) -> dict[str, list[str]]:
    return build_graph(study)[1]


def test_a_method_with_a_new_setting_is_its_module_only(tmp_path, toy):
    assert "levels" not in [f.name for f in dataclasses.fields(QuantizeSettings)]
    # the kind's parameters gained the setting, documented by its comment
    quantize = KINDS["quantize"].params
    assert [f.name for f in dataclasses.fields(quantize)][-1] == "levels"
    assert field_help(quantize)["levels"] == "toy: grid levels per weight"
    nb = json.loads((ROOT / "notebooks" / KINDS["quantize"].notebook).read_text())
    assert "levels: int = 15  # toy: grid levels per weight" in cells.generated_source(nb, quantize)
    # a study file gives it; it enters the toy stage's id only
    chains = _ids(_study(tmp_path, extra="  toy7: [{quantize: {method: toy, levels: 7}}]\n"
                                         "  toy5: [{quantize: {method: toy, levels: 5}}]"))
    assert chains["toy7"][0] != chains["toy5"][0]
    assert quantize(method="toy", levels=7).levels == 7


def test_the_other_methods_ids_do_not_change_with_a_new_setting(tmp_path, toy):
    with_toy = _ids(_study(tmp_path))["gptq"]
    methods.QUANTIZE.pop("toy")
    try:
        without = _ids(_study(tmp_path))["gptq"]
    finally:
        methods.register(toy)
    assert with_toy == without
    # a default of the new setting applies to the methods that read it: gptq's id is unchanged
    assert _ids(_study(tmp_path, defaults=", levels: 7"))["gptq"] == without
    # and a default grid over it expands only the pipelines whose method reads it
    chains = _ids(_study(tmp_path, defaults=", levels: [5, 7]", extra="  toy: [{quantize: {method: toy}}]"))
    assert chains["gptq"] == without and {"toy[levels=5]", "toy[levels=7]"} <= set(chains)
    # a grid over the method too: the points whose method does not read the option are not repeated
    st = _study(tmp_path, extra="  both: [{quantize: {method: [gptq, toy], levels: [5, 7]}}]")
    both = sorted(p.name for p in st.pipelines if p.family == "both")
    assert both == ["both[method=gptq]", "both[method=toy,levels=5]", "both[method=toy,levels=7]"]
    # a select on it likewise: no selection pipelines for gptq
    f = tmp_path / "sel.yaml"
    f.write_text("model: tiny\ndefaults:\n  finetune: {steps: 1, bits: {select: [3, 4], metric: ppl}}\n"
                 "pipelines:\n  l4q: [{finetune: l4q}]\n  qlora: [{quantize: nf4}, {finetune: qlora}]\n")
    names = {p.name for p in load_study(f, allow_network=False).pipelines}
    assert "qlora" in names and not any(n.startswith("qlora~") for n in names)
    assert {"l4q~select[bits=3]", "l4q~select[bits=4]"} <= names


def test_another_methods_setting_is_refused_naming_who_reads_it(tmp_path, toy):
    with pytest.raises(ConfigError, match=r"pipelines.bad\[0\].quantize.levels: 7 has no effect on method 'gptq'; "
                                          r"it applies to toy only"):
        _study(tmp_path, extra="  bad: [{quantize: {method: gptq, levels: 7}}]")
    with pytest.raises(ConfigError, match=r"levels: 0 must be a positive integer"):
        _study(tmp_path, extra="  bad: [{quantize: {method: toy, levels: 0}}]")
    with pytest.raises(ConfigError, match=r"bits: 3 has no effect on method 'qlora'; it applies to l4q, qat_lora only"):
        KINDS["finetune"].params(method="qlora", bits=3)


def test_a_builtin_options_normalise_and_shared_settings_stay_shared():
    finetune = KINDS["finetune"].params
    assert finetune(method="l4q").group_size == 64  # GridOptions: 0 -> the default group
    assert finetune(method="qalora").group_size == 0  # MergedBalancedOptions: 0 -> the base's
    for settings, table in ((QuantizeSettings, methods.quantize_methods()), (FinetuneSettings, methods.finetune_methods())):
        shared = {f.name for f in dataclasses.fields(settings)}
        owned = {f.name for e in table.values() if e.options for f in dataclasses.fields(e.options)}
        assert owned and not shared & owned  # no method's setting among the shared ones


def test_an_option_that_clashes_is_refused_when_the_params_are_composed():
    @dataclass
    class Clash(Options):
        lr: float = 1.0  # clashes with a shared setting

    @dataclass
    class OtherDefault(Options):
        merge: bool = True  # lora's merge defaults to False

    for opts, msg in ((Clash, "'lr' is a setting every method reads"), (OtherDefault, "'merge' is declared by another")):
        methods.register(methods.FinetuneMethod("clash", "x", "float", "float", print, print, options=opts))
        try:
            with pytest.raises(TypeError, match=msg):
                params_class(FinetuneSettings)
        finally:
            methods.FINETUNE.pop("clash")
