"""The stage graph of a study: one node per distinct stage, addressed by its content.

A stage's id is the hash of its kind, its parameters (``params.id_params``) and its input's id (or
the model name at the root), so a stage shared by several pipelines (the fine-tuned model that three
pipelines quantize) exists once and runs once. Torch-free: ``--dry-run`` prints the graph.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ptqlib.methods import FinetuneMethod, QuantizeMethod, finetune_method, quantize_method
from ptqlib.study.expand import quantizes
from ptqlib.study.kinds import KINDS
from ptqlib.study.neutral import ID_NEUTRAL
from ptqlib.study.params import id_params
from ptqlib.study.pipeline import Study


@dataclass
class StageNode:
    id: str
    kind: str
    params: dict
    input_id: str | None  # None: the input is the model itself
    model: str
    task: str
    seed: int
    pipelines: list[str] = field(default_factory=list)
    # evaluate: the pipeline's 16-bit reference, the input of its first quantizing stage (a stage id,
    # or "" for the model itself); None where nothing quantizes. Fixed by the input chain, so not in the id.
    reference: str | None = None

    def label(self) -> str:
        p = self.params
        if self.kind == "quantize":
            return f"quantize({p['method']}{label_extra(quantize_method(p['method']), p)})"
        if self.kind == "finetune":
            extra = label_extra(finetune_method(p["method"]), p)
            return f"finetune({p['method']}{extra}, {p['steps']} steps, seed {self.seed}{', merge' if p['merge'] else ''})"
        return "evaluate(validation)" if p.get("split") == "validation" else "evaluate"


def stage_id(kind: str, params: dict, input_id: str | None, model: str, task: str, seed: int) -> str:
    """Content address: what the stage computes from, and nothing else."""
    params = id_params(kind, params)
    key: dict = {"kind": kind, "params": params, "input": input_id or {"model": model}}
    if KINDS[kind].reads_task:
        key["task"] = task  # quantize calibrates on pydoc text: the task does not change it
    if KINDS[kind].draws:
        key["seed"] = seed  # training; a calibration draw's seed is a parameter (calib_seed)
        if task.startswith(("jsonl:", "hf:")):
            # their train split lost the validation lines (data.load_task): not the models cached before
            key["train_split"] = "without-validation"
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_graph(study: Study) -> tuple[dict[str, StageNode], dict[str, list[str]]]:
    """(nodes by id in dependency order, pipeline name -> its chain of stage ids)."""
    nodes: dict[str, StageNode] = {}
    chains: dict[str, list[str]] = {}
    for pl in study.pipelines:
        prev, chain, reference = None, [], None
        for st in pl.stages:
            if reference is None and quantizes(st):
                reference = prev or ""
            sid = stage_id(st.kind, st.params, prev, pl.model, pl.task, pl.seed)
            node = nodes.setdefault(sid, StageNode(sid, st.kind, st.params, prev, pl.model, pl.task, pl.seed,
                                                   reference=reference if st.kind == "evaluate" else None))
            node.pipelines.append(pl.name)
            chain.append(sid)
            prev = sid
        chains[pl.name] = chain
    return nodes, chains


def label_extra(entry: QuantizeMethod | FinetuneMethod, p: dict) -> str:
    """``", 4b, g64"`` for the entry's label keys (stage labels; ``p``: a stage's params dict). A value left
    out of stage ids (``ID_NEUTRAL``) is left out of labels too."""
    neutral = ID_NEUTRAL.get("quantize" if isinstance(entry, QuantizeMethod) else "finetune", {})
    fmt = {"bits": "{}b", "group_size": "g{}", "pool_norm": "{} pool"}
    return "".join(", " + fmt.get(k, k + " {}").format(p[k]) for k in entry.label_keys
                   if k in p and not (k in neutral and neutral[k] == p[k]))
