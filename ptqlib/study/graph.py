"""The stage graph of a study: one node per distinct stage, addressed by its content.

A stage's id is the hash of its kind, its parameters (``kinds.id_params``) and its input's id (or
the model name at the root), so a stage shared by several pipelines (the fine-tuned model that three
pipelines quantize) exists once and runs once. Torch-free: ``--dry-run`` prints the graph.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ptqlib.data import task_digest
from ptqlib.study.kinds import KINDS, id_params, quantizes
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
        return KINDS[self.kind].label(self.params, self.seed)


def stage_id(kind: str, params: dict, input_id: str | None, model: str, task: str, seed: int) -> str:
    """Content address: what the stage computes from, and nothing else."""
    params = id_params(kind, params)
    key: dict = {"kind": kind, "params": params, "input": input_id or {"model": model}}
    if KINDS[kind].reads_task:
        key["task"] = task  # quantize calibrates on pydoc text: the task does not change it
        content = task_digest(task)
        if content:  # a task read from this machine's files (stdlib-docstrings: the interpreter's library)
            key["task_data"] = content
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
            if reference is None and quantizes(st.kind, st.params):
                reference = prev or ""
            sid = stage_id(st.kind, st.params, prev, pl.model, pl.task, pl.seed)
            node = nodes.setdefault(sid, StageNode(sid, st.kind, st.params, prev, pl.model, pl.task, pl.seed,
                                                   reference=reference if KINDS[st.kind].takes_reference else None))
            node.pipelines.append(pl.name)
            chain.append(sid)
            prev = sid
        chains[pl.name] = chain
    return nodes, chains
