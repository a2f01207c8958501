"""Task and generation metrics, each a pure function on strings (tested on hand-made cases).

- ``exact_match``: every reference field present with the same value (case- and space-insensitive).
- ``field_f1``: F1 of (field, value) pairs: precision over the predicted fields, recall over
  the reference's. An empty prediction scores 0.
- ``rouge_l``: ROUGE-L F-measure from the maintained ``rouge-score`` package.
- ``facts`` / ``fact_scores``: factual consistency. The facts of a text are its numbers and its
  capitalised names; *precision* is the share of the output's facts that occur in the source
  (an invented number lowers it), *recall* the share of the reference's facts the output kept.
  Both are micro-averaged over a set of examples (total supported / total facts), so an empty
  output invents nothing (no effect on precision) and keeps nothing (recall 0).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ptqlib.data import parse_fields, primary_metric
from ptqlib.text import TEXT_SOURCES

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_NAME = re.compile(r"\b[A-Z][a-zA-Z]+(?:\s+[A-Z][a-zA-Z]+)*")
_NOT_NAMES = {"The", "A", "An", "I", "We", "They", "Our", "It", "He", "She", "You", "Thanks", "This", "That",
              "Delivery", "Summarise", "In", "On", "At", "For", "And", "But", "If", "Yes", "No"}


def next_token_closeness(logits, ref_logits, targets):
    """Per position, how close a model's next-token distribution is to a reference's, as llama.cpp's
    ``perplexity --kl-divergence`` reports it: ``(nll, kl, top1, dp)``, each shaped like ``targets`` (...,).

    ``logits``, ``ref_logits`` (..., vocab), float32 at least; ``targets`` (...,) the actual next tokens.
    ``nll``: the model's NLL of the target; ``kl``: ``KL(P_ref || P_model)`` over the whole vocabulary; ``top1``:
    1 where both most likely tokens agree; ``dp`` (Delta-p): the model's probability of the target less the
    reference's. One definition for the torch runtime and llama.cpp's (whose logits come back as numpy).
    """
    import torch  # here: reading the metric registry (a study file) imports no torch

    lp = torch.log_softmax(logits, -1)
    lr = torch.log_softmax(ref_logits, -1)
    t = targets.unsqueeze(-1)
    nll = -lp.gather(-1, t).squeeze(-1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    top1 = (lr.argmax(-1) == lp.argmax(-1)).float()
    dp = (-nll).exp() - lr.gather(-1, t).squeeze(-1).exp()
    return nll, kl, top1, dp


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def exact_match(pred: str, ref: str) -> float:
    r, p = parse_fields(ref), parse_fields(pred)
    if not r:
        return float(_norm(pred) == _norm(ref))
    return float(all(_norm(p.get(k, "\0")) == _norm(v) for k, v in r.items()))


def field_f1(pred: str, ref: str) -> float:
    r = {(k, _norm(v)) for k, v in parse_fields(ref).items()}
    p = {(k, _norm(v)) for k, v in parse_fields(pred).items()}
    hit = len(r & p)
    if not hit:
        return 0.0
    prec, rec = hit / len(p), hit / len(r)
    return 2 * prec * rec / (prec + rec)


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not pred.strip() or not ref.strip():
        return 0.0
    return _ROUGE.score(ref, pred)["rougeL"].fmeasure


def facts(text: str) -> set[str]:
    """Numbers and capitalised names (multi-word names kept whole), normalised."""
    out = {n.replace(",", "") for n in _NUMBER.findall(text)}
    for m in _NAME.findall(text):
        words = [w for w in m.split() if w not in _NOT_NAMES]
        if words:
            out.add(" ".join(words).lower())
    return out


def _supported(fact: str, source: str) -> bool:
    if fact[0].isdigit():
        return fact in {n.replace(",", "") for n in _NUMBER.findall(source)}
    return fact in _norm(source)


def fact_counts(pred: str, source: str, ref: str) -> tuple[int, int, int, int]:
    """(facts in pred, of them in source, facts in ref, of them in pred)."""
    fp, fr = facts(pred), facts(ref)
    return len(fp), sum(_supported(f, source) for f in fp), len(fr), sum(_supported(f, pred) for f in fr)


def example_scores(preds: list[str], refs: list[str], sources: list[str]) -> dict[str, list[float]]:
    """Per-example columns (one value per example, in order): what the task metrics' statistics aggregate.

    ``fact_pred`` / ``fact_sup`` / ``fact_ref`` / ``fact_kept`` are the counts of
    :func:`fact_counts`, kept as counts so precision and recall stay micro-averaged when
    examples are resampled.
    """
    counts = [fact_counts(p, s, r) for p, s, r in zip(preds, sources, refs)]
    return {
        "exact_match": list(map(exact_match, preds, refs)),
        "field_f1": list(map(field_f1, preds, refs)),
        "rouge_l": list(map(rouge_l, preds, refs)),
        "empty_outputs": [float(not p.strip()) for p in preds],
        "fact_pred": [float(c[0]) for c in counts],
        "fact_sup": [float(c[1]) for c in counts],
        "fact_ref": [float(c[2]) for c in counts],
        "fact_kept": [float(c[3]) for c in counts],
    }


def task_score(values: dict, task: str):
    """The ``task_score`` of ``values`` (a record's metrics, or a task unit's scores) on ``task``: its primary
    metric's value (``data.primary_metric``), None where that is not recorded. Read, not recorded, so records
    written before the name existed serve a claim on it too."""
    return values.get(primary_metric(task))


@dataclass(frozen=True)
class Statistic:
    """How a metric is computed from per-unit columns: ``transform(sum(num) / sum(den))``.

    ``group`` names the units (``task``: held-out task examples; ``ppl`` / ``ppl_<source>``:
    perplexity windows). A mean has no ``den`` (each unit counts 1); micro-averaged ratios and
    perplexity (``exp(total NLL / total tokens)``) do. Written once so the report's numbers and
    the bootstrap over examples compute every metric the same way.

    Called with ``den`` where the metric has none, ``den`` holds the units' sizes: the claims sum a mean's
    examples per document (``report.claims._unit_arrays``), and a document of k examples counts k.
    """

    group: str
    num: str
    den: str | None = None
    exp: bool = False

    def __call__(self, num, den=None):
        value = sum(num) / (sum(den) if den is not None else len(num))
        return math.exp(value) if self.exp else value


# ---- the metric registry: every metric once, with everything the study, the claims and the report ask of it ----
@dataclass(frozen=True)
class Metric:
    """One metric a stage records: how it is computed, which way is better and where it is shown.

    Claims, selection, the analysis' tables and plots and the stage checks derive their lists from
    :data:`METRICS`, so a new metric is one :func:`register` call here (and its computation).
    """

    name: str
    help: str
    statistic: Statistic | None = None  # its per-unit definition; None: a run-level figure (no units to resample)
    lower_is_better: bool = False
    bounded: bool = False  # a score in [0, 1]: a mean near 0 or 1 is flagged at the floor / ceiling in claims
    shown: str = ""  # "quality" or "cost": a column of the report's summary table ("": not in it)
    plot: str = ""  # "quality" or "deployment": a panel of the report's bar plots ("": not plotted)
    needs: str = ""  # what the evaluate stage must do to record it: task, ppl, kl, speed, llama.cpp ("": always)
    source: str | None = None  # the held-out text source of a ppl / kl metric
    stage: str = "evaluate"  # the stage kind whose record holds it (results.csv: "<stage>.<name>" unless evaluate)
    per_task: bool = False  # read as the task's own metric (task_score: data.primary_metric), not computed by a stage
    fields: bool = False  # scores "field: value" references: undefined on a task without them (data.has_fields)

    @property
    def column(self) -> str:
        """Its column in results.csv."""
        return self.name if self.stage == "evaluate" else f"{self.stage}.{self.name}"


METRICS: dict[str, Metric] = {}


def register(m: Metric) -> Metric:
    """Add ``m`` to :data:`METRICS` (a name registered twice is a mistake, not an override)."""
    if m.name in METRICS:
        raise ValueError(f"metric {m.name!r} is registered twice")
    METRICS[m.name] = m
    return m


for _src in TEXT_SOURCES:  # perplexity and closeness to the 16-bit model, per held-out source
    _sfx = "" if _src == "pydoc" else f"_{_src}"
    register(Metric("ppl" + _sfx, f"perplexity on held-out {_src} windows (exp of the token-weighted mean NLL)",
                    Statistic("ppl" + _sfx, "nll", "tokens", exp=True), lower_is_better=True, shown="quality",
                    plot="quality", needs="ppl", source=_src))
for _src in TEXT_SOURCES:
    _sfx = "" if _src == "pydoc" else f"_{_src}"
    register(Metric("kl" + _sfx, f"mean per-token KL(16-bit || model) on the {_src} windows",
                    Statistic("ppl" + _sfx, "kl", "tokens"), lower_is_better=True, shown="quality", needs="kl",
                    source=_src))
for _src in TEXT_SOURCES:
    _sfx = "" if _src == "pydoc" else f"_{_src}"
    register(Metric("top1_agree" + _sfx, f"share of {_src} tokens whose most likely next token is the 16-bit model's",
                    Statistic("ppl" + _sfx, "top1", "tokens"), shown="quality", needs="kl", source=_src))
for _src in TEXT_SOURCES:  # how llama.cpp's perplexity --kl-divergence describes closeness, beside the mean KL
    _sfx = "" if _src == "pydoc" else f"_{_src}"
    register(Metric("delta_p" + _sfx, f"mean Delta-p on the {_src} windows: the model's probability of the actual "
                    "next token less the 16-bit model's", Statistic("ppl" + _sfx, "dp", "tokens"), needs="kl",
                    source=_src))
    for _q, _what in (("p50", "median"), ("p90", "90th percentile"), ("p99", "99th percentile"), ("max", "maximum")):
        register(Metric(f"kl_{_q}{_sfx}", f"the {_what} of the per-token KL(16-bit || model) on the {_src} windows",
                        lower_is_better=True, needs="kl", source=_src))
register(Metric("exact_match", "every reference field present with the same value", Statistic("task", "exact_match"),
                bounded=True, shown="quality", plot="quality", needs="task"))
register(Metric("field_f1", "F1 of the (field, value) pairs", Statistic("task", "field_f1"), bounded=True,
                shown="quality", plot="quality", needs="task", fields=True))
register(Metric("rouge_l", "ROUGE-L F-measure", Statistic("task", "rouge_l"), bounded=True, shown="quality",
                needs="task"))
register(Metric("task_score", "the task's own score (data.primary_metric): field F1 on the meetings tasks, ROUGE-L on "
                "stdlib-docstrings, jsonl and hf tasks; one name for a claim or selection over several tasks",
                Statistic("task", "task_score"), bounded=True, needs="task", per_task=True))
register(Metric("empty_outputs", "share of empty generations", Statistic("task", "empty_outputs"),
                lower_is_better=True, needs="task"))
register(Metric("fact_precision", "share of the output's numbers and names found in the source (micro-averaged)",
                Statistic("task", "fact_sup", "fact_pred"), bounded=True, shown="quality", plot="quality", needs="task"))
register(Metric("fact_recall", "share of the reference's numbers and names the output kept (micro-averaged)",
                Statistic("task", "fact_kept", "fact_ref"), bounded=True, shown="quality", needs="task"))
register(Metric("size_mb_deploy", "MiB of the deployable weights", lower_is_better=True, shown="cost", plot="deployment"))
register(Metric("size_mb_stored", "MiB of the stage's stored weights", lower_is_better=True, shown="cost"))
register(Metric("model_params", "parameters of the evaluated model"))
register(Metric("gen_tokens_per_s", "generated tokens per second (batched greedy)", shown="cost", plot="deployment",
                needs="task"))
register(Metric("gen_seconds", "seconds of batched greedy generation", lower_is_better=True, needs="task"))
register(Metric("ppl_seconds", "seconds of the perplexity windows", lower_is_better=True))
register(Metric("ttft_s", "seconds to the first token of one prompt", lower_is_better=True, needs="speed"))
register(Metric("decode_tokens_per_s", "decode tokens per second of one prompt", needs="speed"))
register(Metric("peak_rss_mb", "peak resident MiB of the llama.cpp process", lower_is_better=True, needs="llama.cpp"))
register(Metric("load_seconds", "seconds to load the GGUF file in llama.cpp", lower_is_better=True, needs="llama.cpp"))
register(Metric("train_seconds", "seconds of training", lower_is_better=True, shown="cost", stage="finetune"))
register(Metric("peak_mem_mb", "peak MiB while training", lower_is_better=True, shown="cost", stage="finetune"))
register(Metric("step_seconds", "seconds per optimizer step", lower_is_better=True, stage="finetune"))
register(Metric("train_loss_first", "training loss of the first step", lower_is_better=True, stage="finetune"))
register(Metric("train_loss_last", "training loss of the last step", lower_is_better=True, stage="finetune"))
register(Metric("quant_seconds", "seconds of quantization", lower_is_better=True, shown="cost", stage="quantize"))


def metric(name: str) -> Metric | None:
    """The registered metric of a name or a results.csv column ("finetune.peak_mem_mb"); None if unknown."""
    return METRICS.get(name) or METRICS.get(name.rsplit(".", 1)[-1]) if isinstance(name, str) else None


LMEVAL_ITEM = re.compile(r"lmeval\.([\w-]+)\.(\w+)(\.[\w-]+)?")  # lmeval.<task>.<metric>[.<filter>]


def statistic(name: str) -> Statistic | None:
    """The per-unit definition of ``name``, or None for a run-level metric (size, speed, loss). An lm-eval
    metric is the mean of its items (group ``lmeval.<task>``), which the evaluate stage records as units where
    lm-eval's aggregate is that mean (``stages.lmeval.sample_units``); a report without them pairs runs."""
    m = METRICS.get(name)
    if m:
        return m.statistic
    hit = LMEVAL_ITEM.fullmatch(name) if isinstance(name, str) else None
    if hit and not hit.group(2).endswith("_stderr") and hit.group(2) != "n_samples":
        return Statistic(f"lmeval.{hit.group(1)}", name)
    return None


def ppl_statistic(name: str) -> Statistic | None:
    """The statistic of a perplexity metric (``ppl``, ``ppl_<source>``); None for any other."""
    m = METRICS.get(name)
    return m.statistic if m and m.needs == "ppl" and m.statistic else None


def task_statistics() -> dict[str, Statistic]:
    """The task metrics the evaluate stage computes (per-example units) -> their statistics, in registry order
    (``task_score`` is read from them, not computed: :func:`task_score`)."""
    return {n: m.statistic for n, m in METRICS.items() if m.statistic and m.statistic.group == "task" and not m.per_task}


def task_scores(preds: list[str], refs: list[str], sources: list[str]) -> dict[str, float]:
    """Every task metric of the registry: means, and micro-averaged fact precision / recall."""
    if not preds:
        return {}
    cols = example_scores(preds, refs, sources)
    out = {}
    for name, st in task_statistics().items():
        den = cols[st.den] if st.den else None
        out[name] = st(cols[st.num], den) if not den or sum(den) else math.nan
    return out


def evaluate_metric_names() -> list[str]:
    """Every metric the evaluate stage can record, per-unit first; ``lmeval.<task>.<metric>`` last."""
    ev = [m for m in METRICS.values() if m.stage == "evaluate"]
    return [*(m.name for m in ev if m.statistic), *(m.name for m in ev if not m.statistic), "lmeval.<task>.<metric>"]


def known_evaluate_metric(name) -> bool:
    return isinstance(name, str) and (name in evaluate_metric_names()[:-1]
                                      or re.fullmatch(r"lmeval\.[\w-]+\.\w+", name) is not None)


def lower_is_better(name: str) -> bool:
    """Perplexities, KL, sizes, times and losses (the registry's flag); a results.csv column by its last part."""
    m = metric(name)
    return bool(m and m.lower_is_better)


def bounded(name: str) -> bool:
    """A score in [0, 1] whose mean can sit at a floor or a ceiling (claims flag it there)."""
    m = metric(name)
    return bool(m and m.bounded)


def shown(kind: str) -> list[str]:
    """The results.csv columns of the report's summary table of ``kind`` ("quality" or "cost"), in registry order."""
    return [m.column for m in METRICS.values() if m.shown == kind]


def plotted(panel: str) -> list[str]:
    """The results.csv columns of the report's bar-plot ``panel`` ("quality" or "deployment")."""
    return [m.column for m in METRICS.values() if m.plot == panel]
