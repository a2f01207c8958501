"""Data: a registry of tasks, text for calibration / perplexity, and SFT tokenization.

Task names (the ``task`` key of a study):
- ``meetings``: a generated, seeded "sales-call transcript -> structured summary" task. Every
  example has a reference answer with 7 fields, so exact match, field F1 and factual
  consistency (are the numbers and names in the output in the transcript?) are measurable.
  The transcript mentions a list price and a negotiated price, so copying is not enough.
  ``meetings-hard``: the same fields, revised during the call (the studies' generated task).
- ``stdlib-docstrings``: real, human-written text: a standard-library function without its
  docstring -> the docstring's summary as its author wrote it (``ptqlib.docstrings``). Its examples
  carry their module as ``doc``, so its intervals cluster by source document.
- ``jsonl:<path>``: the user's own prompt / completion pairs, one JSON object a line.
- ``hf:<dataset>[:<config>]``: a hub dataset through ``datasets`` (online machines only).

Every task has three disjoint splits: ``train`` (fine-tuning), ``validation`` (choosing settings:
``select`` in a study file, ``ptqlib.study.selection``) and ``test`` (the reported numbers). How each
is drawn: :func:`load_task`.

Real text for calibration and held-out perplexity (``pydoc``, ``stdlib``) is ``ptqlib.text``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ptqlib.errors import ConfigError

TASKS = ("meetings", "meetings-hard", "stdlib-docstrings")
TASK_PREFIXES = ("jsonl:", "hf:")
SPLITS = ("train", "validation", "test")
# seed bases of the generated tasks' splits: example i of a split is generated from base + i
MEETINGS_BASES = {"train": 0, "test": 1_000_000, "validation": 2_000_000}


@dataclass
class Example:
    """One prompt / completion pair; ``source`` is the text the answer must be faithful to, ``doc`` the
    index of the source document it comes from (-1: none; examples of one document are not independent)."""

    prompt: str
    completion: str
    source: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    doc: int = -1


# ---------------------------------------------------------------------------------------------
# the generated meetings task

_CUSTOMERS = ["Northwind Traders", "Blue Harbor Logistics", "Kestrel Foods", "Orchid Health", "Granite Works",
              "Sunline Retail", "Pioneer Labs", "Maple Transit", "Cobalt Energy", "Vista Hotels", "Redwood Bank",
              "Atlas Mining", "Lumen Media", "Harbor Pharma", "Summit Schools", "Ironclad Security"]
_PRODUCTS = ["Atlas router", "Nimbus storage array", "Helix CRM licence", "Orion laptop", "Quasar switch",
             "Vega analytics seat", "Zephyr camera", "Pulse sensor kit", "Terra backup plan", "Nova headset"]
_PEOPLE = ["Priya", "Marco", "Aisha", "Tomas", "Mei", "Oliver", "Fatima", "Jonas", "Elena", "Kwame", "Sofia", "Raj"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DECISIONS = {
    "approved": ["They accepted the offer.", "The customer signed off on it.", "{c} agreed to go ahead."],
    "rejected": ["They declined the offer.", "The customer said no for now.", "{c} turned it down."],
    "postponed": ["They want to revisit it next quarter.", "The customer asked to pause the decision.",
                  "{c} will decide after their budget review."],
}
FIELDS = ("customer", "product", "quantity", "unit_price", "deadline", "owner", "decision")
MEETINGS_INSTRUCTION = (
    "Summarise the sales call below as 7 lines 'field: value' with the fields "
    "customer, product, quantity, unit_price, deadline, owner, decision.\n\n"
)
MEETINGS_HARD_INSTRUCTION = (
    "Summarise the call as 7 lines 'field: value' (customer, product, quantity, unit_price, deadline, "
    "owner, decision), each with its last agreed value.\n\n"
)


def _meeting(rng: random.Random) -> Example:
    c, p = rng.choice(_CUSTOMERS), rng.choice(_PRODUCTS)
    a, b = rng.sample(_PEOPLE, 2)
    qty = rng.randrange(5, 500)
    list_price = rng.randrange(40, 900) * 5
    final = list_price - rng.randrange(1, 20) * 5
    day, month = rng.randrange(1, 29), rng.choice(_MONTHS)
    decision = rng.choice(list(_DECISIONS))
    owner = rng.choice([a, b])
    lines = [
        f"{a}: Thanks for joining. {c} is asking for {qty} units of the {p}.",
        f"{b}: Our list price is ${list_price} per unit, but we can offer ${final} per unit.",
        f"{a}: Delivery would have to be done by {day} {month}.",
        f"{b}: " + rng.choice(_DECISIONS[decision]).format(c=c),
        f"{owner}: I will own the follow-up with {c}.",
    ]
    if rng.random() < 0.5:  # vary the order of the middle lines so position is not the answer
        lines[1], lines[2] = lines[2], lines[1]
    source = "\n".join(lines)
    fields = {"customer": c, "product": p, "quantity": str(qty), "unit_price": str(final),
              "deadline": f"{day} {month}", "owner": owner, "decision": decision}
    completion = "\n".join(f"{k}: {fields[k]}" for k in FIELDS)
    return Example(prompt=MEETINGS_INSTRUCTION + source, completion=completion, source=source, fields=fields)


# ---------------------------------------------------------------------------------------------
# the harder variant: meetings-hard

_SMALLTALK = [
    "{x}: Side note, {oc} bought {n} units of the {op} last week.",
    "{x}: Unrelated, the {op} is back in stock on {od} {om}.",
    "{x}: For comparison, {oc} pays ${n2} per unit for the {op}.",
]


def _meeting_hard(rng: random.Random) -> Example:
    """A call with corrections and a distractor: the answer is the *last agreed* value of each field.

    Against ``meetings`` this adds, each independently (so fields differ in difficulty): a
    second price concession, the deadline moved (or a move refused), the quantity revised,
    the follow-up handed to someone else, a third participant, and one line of small talk
    with another customer, product, number or date that belongs to no field. Lines are
    terse on purpose: on a CPU the prompt's prefill is most of the evaluation's cost.
    """
    c, p = rng.choice(_CUSTOMERS), rng.choice(_PRODUCTS)
    oc = rng.choice([x for x in _CUSTOMERS if x != c])
    op = rng.choice([x for x in _PRODUCTS if x != p])
    a, b, x = rng.sample(_PEOPLE, 3)
    qty = rng.randrange(5, 500)
    list_price = rng.randrange(40, 900) * 5
    offer = list_price - rng.randrange(1, 12) * 5
    day, month = rng.randrange(1, 29), rng.choice(_MONTHS)
    decision = rng.choice(list(_DECISIONS))
    talk = rng.choice(_SMALLTALK).format(x=rng.choice([a, b, x]), oc=oc, op=op, n=rng.randrange(5, 500),
                                         n2=rng.randrange(40, 900) * 5, od=rng.randrange(1, 29), om=rng.choice(_MONTHS))
    price = [f"{b}: List price is ${list_price}, we offer ${offer} per unit."]
    final = offer
    if rng.random() < 0.5:  # a second concession: the last price offered is the answer
        final = offer - rng.randrange(1, 6) * 5
        price.append(f"{x}: If they sign now, ${final} per unit.")
    date = [f"{a}: Delivery by {day} {month}."]
    r = rng.random()
    if r < 0.35:  # the deadline moves
        day, month = rng.randrange(1, 29), rng.choice(_MONTHS)
        date.append(f"{b}: Can we move it to {day} {month}? {a}: Yes, agreed.")
    elif r < 0.55:  # a move is asked for and refused: the first date stands
        date.append(f"{b}: Can we move it to {rng.randrange(1, 29)} {rng.choice(_MONTHS)}? {a}: No, the date stays.")
    middle = [price, date, [talk]]
    rng.shuffle(middle)
    lines = [f"{a}: {c} wants {qty} units of the {p}."] + [l for block in middle for l in block]
    if rng.random() < 0.4:  # the quantity is revised
        qty = rng.randrange(5, 500)
        lines.append(f"{a}: Correction, make that {qty} units.")
    lines.append(f"{b}: " + rng.choice(_DECISIONS[decision]).format(c=c))
    owner = rng.choice([a, b])
    lines.append(f"{owner}: I own the follow-up.")
    if rng.random() < 0.4:  # handed over: the new owner is the answer
        owner = rng.choice([y for y in (a, b, x) if y != owner])
        lines.append(f"{owner}: Actually, I will take it.")
    source = "\n".join(lines)
    fields = {"customer": c, "product": p, "quantity": str(qty), "unit_price": str(final),
              "deadline": f"{day} {month}", "owner": owner, "decision": decision}
    completion = "\n".join(f"{k}: {fields[k]}" for k in FIELDS)
    return Example(prompt=MEETINGS_HARD_INSTRUCTION + source, completion=completion, source=source, fields=fields)


def meetings(split: str, n: int, hard: bool = False) -> list[Example]:
    """Seeded examples, identical on every call; each split has its own seed range
    (:data:`MEETINGS_BASES`, disjoint for ``n`` < 10^6): validation got a new base, so train and
    test are the examples they were before it existed."""
    base = MEETINGS_BASES[split]
    make = _meeting_hard if hard else _meeting
    return [make(random.Random(base + i)) for i in range(n)]


def parse_fields(text: str) -> dict[str, str]:
    """'field: value' lines -> dict (first occurrence wins; keys lower-cased, values stripped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            k = k.strip().lower()
            if k and k not in out:
                out[k] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# user data


JSONL_FORMAT = 'expected one JSON object per line: {"prompt": "...", "completion": "...", "source": "..." (optional)}'


def read_jsonl(path: str | Path) -> list[Example]:
    """Prompt / completion pairs; errors name the file, the line and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task 'jsonl:{path}': file not found")
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#x}); save the file as UTF-8") from None
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{no}: not valid JSON ({e.msg}); {JSONL_FORMAT}") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "completion")):
            raise ConfigError(f"{path}:{no}: each line must be an object with string 'prompt' and 'completion'; "
                              f"{JSONL_FORMAT}")
        if not rec["prompt"].strip() or not rec["completion"].strip():
            # an empty reference would score an empty output as an exact match
            raise ConfigError(f"{path}:{no}: empty {'prompt' if not rec['prompt'].strip() else 'completion'}; "
                              "every example needs both")
        out.append(Example(prompt=rec["prompt"], completion=rec["completion"], source=rec.get("source", rec["prompt"])))
    if len(out) < 2:
        raise ConfigError(f"{path}: needs at least 2 examples (one to train, one to test), found {len(out)}")
    return out


def _hf_examples(spec: str, split: str) -> list[Example]:
    name, _, cfg = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, cfg or None, split="train")
    except Exception as e:  # offline, unknown name, ...
        raise ConfigError(f"task 'hf:{spec}': cannot load the dataset ({type(e).__name__}: {e})") from e
    cols = set(ds.column_names)
    for p, c in (("prompt", "completion"), ("instruction", "output"), ("question", "answer")):
        if {p, c} <= cols:
            break
    else:
        raise ConfigError(f"task 'hf:{spec}': no prompt/completion columns among {sorted(cols)}")
    rows = [Example(prompt=r[p] + (("\n\n" + r["input"]) if r.get("input") else ""), completion=r[c]) for r in ds]
    return [e for i, e in enumerate(rows) if _hf_split(i) == split]


def _hf_cached(name: str) -> bool:
    """Is there a local copy of hub dataset ``name`` (the datasets cache or the hub cache)?"""
    import datasets.config
    import huggingface_hub.constants

    return (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir() or \
        (Path(huggingface_hub.constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))).is_dir()


def _check_hf_reachable(spec: str) -> None:
    """Refuse at once an ``hf:`` task that cannot load here: not cached, and the hub switched off or
    unreachable (``datasets`` would retry for a minute or more, after the study's first stages ran)."""
    from ptqlib import hub

    name = spec.partition(":")[0]
    if _hf_cached(name):
        return
    why = ("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" if hub.hub_offline() else
           None if hub.hub_reachable() else "the hub (huggingface.co:443) cannot be reached from this machine")
    if why:
        raise ConfigError(f"task 'hf:{spec}': the dataset is not in the local cache and cannot be downloaded ({why}); "
                          "use a jsonl:<path> task, or run once where the hub is reachable to cache it")


def _hf_split(i: int) -> str:
    """The split of row ``i`` of a hub dataset: test every 10th from 0 (as always), validation
    every 10th from 5 (taken from what was train)."""
    return "test" if i % 10 == 0 else "validation" if i % 10 == 5 else "train"


def _jsonl_split(i: int, n: int) -> str:
    """The split of line ``i`` (of ``n`` examples) of a jsonl task: test every 5th from 4 (as
    always; with fewer than 5 lines the last), validation every 5th from 1 (taken from what was
    train; none with fewer than 5 lines)."""
    if n < 5:
        return "test" if i == n - 1 else "train"
    return "test" if i % 5 == 4 else "validation" if i % 5 == 1 else "train"


def check_task(task: str, allow_network: bool = True) -> None:
    """Refuse an unknown task, a bad jsonl file, or (``allow_network``: a real run) an ``hf:`` task
    that can neither be read from the local cache nor downloaded."""
    if task in TASKS:
        return
    if task.startswith("jsonl:"):
        read_jsonl(task[len("jsonl:"):])
        return
    if task.startswith("hf:") and len(task) > 3:
        if allow_network:
            _check_hf_reachable(task[len("hf:"):])
        return
    raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASKS)}, 'jsonl:<path>', 'hf:<dataset>[:<config>]'")


def load_task(task: str, split: str, n: int) -> list[Example]:
    """Up to ``n`` examples of a task's ``train``, ``validation`` or ``test`` split (deterministic,
    the three disjoint).

    ``meetings`` / ``meetings-hard``: generated from a seed range per split (:func:`meetings`);
    train and test are unchanged by the validation split. ``stdlib-docstrings``: split by module
    (``docstrings.split_of``), the first ``n`` spread over the split's modules. ``jsonl:`` / ``hf:``: by line / row
    index, so the splits are stable when lines are appended; test is every 5th line (hub: every
    10th row), as before, and validation is carved out of what was train (every 5th line from
    line 1; hub: every 10th row from row 5). So these tasks train on 3/5 (8/10) of the data
    where they trained on 4/5 (9/10) before validation existed, whether or not the study selects
    anything: one rule, so a model never depends on which other stages a study has. (Their
    finetune stage ids changed with it, see ``study.graph.stage_id``.)
    """
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not a task split; valid: {', '.join(SPLITS)}")
    check_task(task)
    if task in ("meetings", "meetings-hard"):
        return meetings(split, n, hard=task == "meetings-hard")
    if task == "stdlib-docstrings":
        from ptqlib import docstrings

        return [Example(prompt=docstrings.prompt(r["code"]), completion=r["summary"], source=r["code"], doc=r["doc"])
                for r in docstrings.extract()[split][:n]]
    if task.startswith("jsonl:"):
        rows = read_jsonl(task[len("jsonl:"):])
        out = [e for i, e in enumerate(rows) if _jsonl_split(i, len(rows)) == split]
        if not out:  # only validation can be empty (read_jsonl needs 2 lines: one train, one test)
            raise ConfigError(f"task {task!r} has {len(rows)} examples: a validation split needs at least 5 "
                              "(every 5th line from line 1 is validation)")
        return out[:n]
    return _hf_examples(task[len("hf:"):], split)[:n]


def has_fields(task: str) -> bool | None:
    """Whether ``task``'s references are "field: value" lines, which ``field_f1`` scores: True for the meetings
    tasks, False for stdlib-docstrings (free text: every output would score 0), None for a user or hub task (not
    known before its examples load)."""
    return True if task in ("meetings", "meetings-hard") else False if task in TASKS else None


def primary_metric(task: str) -> str:
    """The metric a task is scored by (``task_score`` in results and units, so one claim or selection reads each
    task's own score in a study over several tasks): field F1 where the references are fields (the meetings
    tasks), else ROUGE-L (stdlib-docstrings' summaries, user and hub tasks)."""
    return "field_f1" if has_fields(task) else "rouge_l"


def task_digest(task: str) -> str | None:
    """A digest of a task's content where it depends on this machine (the interpreter's standard library
    for ``stdlib-docstrings``): it enters the stage ids, so other content never reuses a run. None for the
    generated tasks (their content is the code's) and user files."""
    if task == "stdlib-docstrings":
        from ptqlib import docstrings

        return docstrings.digest()
    return None


# ---------------------------------------------------------------------------------------------
# tokenization


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: the chat template for instruct models, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def sft_features(tokenizer, examples: list[Example], max_length: int) -> list[dict]:
    """input_ids / labels with the loss on the answer only (prompt tokens labelled -100).

    Long prompts are cut from the left so the answer (what is learned) always survives.
    """
    feats = []
    eos = tokenizer.eos_token or ""
    for ex in examples:
        p = tokenizer(format_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion + eos, add_special_tokens=False)["input_ids"]
        c = c[:max_length]
        p = p[-(max_length - len(c)):] if max_length > len(c) else []
        feats.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return feats


def collate(features: list[dict], pad_id: int):
    """Right-pad a batch for training (labels padded with -100)."""
    import torch

    n = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), n), pad_id, dtype=torch.long)
    labels = torch.full((len(features), n), -100, dtype=torch.long)
    mask = torch.zeros((len(features), n), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        labels[i, :k] = torch.tensor(f["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
