"""Real text for calibration and held-out perplexity, split deterministically.

``pydoc`` (CPython's language reference, ``pydoc_data.topics``), split by topic (a topic is held out
when the SHA-1 of its name is 0 mod 5: 19 of 79 topics, 88 K of 465 K characters); ``stdlib``
(standard-library source code, held-out text only). :func:`text_windows` cuts calibration windows,
:func:`held_out_windows` the perplexity windows (random slots over every document, or the first).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ptqlib.errors import ConfigError

TEXT_SOURCES = ("pydoc", "stdlib")


def pydoc_split() -> tuple[dict[str, str], dict[str, str]]:
    """(train topics, held-out topics) of CPython's language reference."""
    from pydoc_data.topics import topics

    train, held = {}, {}
    for name in sorted(topics):
        heldout = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 5 == 0
        (held if heldout else train)[name] = topics[name]
    return train, held


# Held-out source code: whole modules of CPython's standard library, a second real-text domain
# for perplexity (code, not prose). A fixed list, so every run scores the same files; none of
# them is used for calibration (that is pydoc train text).
STDLIB_MODULES = ("argparse", "textwrap", "fractions", "heapq", "bisect", "calendar", "csv", "difflib", "shlex",
                  "string", "statistics", "dataclasses", "functools", "graphlib", "ipaddress", "configparser")


def stdlib_docs() -> dict[str, str]:
    """Module name -> source of :data:`STDLIB_MODULES` (this interpreter's standard library)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {name: (root / f"{name}.py").read_text(encoding="utf-8") for name in STDLIB_MODULES
            if (root / f"{name}.py").is_file()}
    if not docs:
        raise ConfigError(f"text source 'stdlib': no module of {STDLIB_MODULES} found under {root}")
    return docs


def stdlib_text() -> str:
    """The source of :data:`STDLIB_MODULES`, concatenated."""
    return "\n\n".join(f"# file: {name}.py\n" + text for name, text in stdlib_docs().items())


def text_windows(tokenizer, split: str, seq_len: int, n: int, seed: int = 0, source: str = "pydoc"):
    """``n`` token windows of length ``seq_len`` as a LongTensor (n, seq_len).

    ``split='train'``: random windows of the training topics (calibration; depends on ``seed``;
    pydoc only). ``split='test'``: consecutive non-overlapping windows of the held-out text
    (perplexity; the same for every seed, so every pipeline is scored on identical tokens):
    the held-out pydoc topics, or for ``source='stdlib'`` the modules of :data:`STDLIB_MODULES`.
    """
    import torch

    ids = torch.tensor(_joined_ids(tokenizer, split, source), dtype=torch.long)
    if split == "train":
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq_len, (n,), generator=g)
        return with_bos(tokenizer, torch.stack([ids[s : s + seq_len] for s in starts.tolist()]))
    n_avail = len(ids) // seq_len
    if n > n_avail:
        raise ConfigError(f"held-out {source} text has only {n_avail} windows of {seq_len} tokens; asked for {n}")
    return with_bos(tokenizer, ids[: n * seq_len].view(-1, seq_len)[:n])


def leading_bos(tokenizer) -> int | None:
    """The token a tokenizer puts before every text it encodes (Gemma's ``<bos>``), or None (SmolLM2, tiny)."""
    ids, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == len(plain) + 1 and ids[1:] == plain else None


def with_bos(tokenizer, windows):
    """``windows (n, L)`` starting with the tokenizer's leading BOS where it has one (their last token dropped, so
    L stays): a model trained on texts that all begin with BOS (Gemma) scores a window without it as if it were
    a broken input (Gemma 3 270M: prose perplexity ~96 without, ~18 with, on pydoc). Unchanged otherwise."""
    import torch

    bos = leading_bos(tokenizer)
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows[:, :-1]], dim=1)


def _joined_ids(tokenizer, split: str, source: str) -> list[int]:
    """The token ids of a split's text joined into one (``text_windows``' layout)."""
    if source not in TEXT_SOURCES:
        raise ConfigError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES)}")
    if source == "stdlib":
        if split == "train":
            raise ConfigError("text source 'stdlib' is held-out text only; calibrate on 'pydoc'")
        text = stdlib_text()
    else:
        train, held = pydoc_split()
        text = "\n\n".join((train if split == "train" else held).values())
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _document_ids(tokenizer, source: str) -> tuple[list[int], list[int]]:
    """(token ids of the held-out documents, each tokenized on its own and joined; each token's document index)."""
    if source not in TEXT_SOURCES:
        raise ConfigError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES)}")
    docs = stdlib_docs() if source == "stdlib" else pydoc_split()[1]
    ids: list[int] = []
    doc_of: list[int] = []
    for d, text in enumerate(docs.values()):
        toks = tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        ids += toks
        doc_of += [d] * len(toks)
    return ids, doc_of


def _slots(n_ids: int, seq_len: int, g) -> tuple[int, int]:
    """(the random shift, the number of aligned ``seq_len`` slots after it): the first draw of ``g``."""
    import torch

    shift = int(torch.randint(0, seq_len, (1,), generator=g))
    return shift, (n_ids - shift) // seq_len


WINDOW_LAYOUTS = ("random", "first")


def held_out_windows(tokenizer, source: str, seq_len: int, n: int, layout: str = "random", seed: int = 0):
    """``(windows (n, seq_len) LongTensor, docs: list[int])``: perplexity windows of a held-out source
    and, per window, the index of the document (pydoc topic, stdlib module) its middle token is in.

    ``layout='random'``: ``n`` non-overlapping windows at seeded random positions over the whole
    held-out text (every topic / module tokenized on its own, then joined): a random shift in
    ``[0, seq_len)``, then ``n`` of the aligned slots drawn without replacement, in text order. So
    the windows represent the domain, not its first pages; windows of one document are not
    independent, which is why the claims' intervals cluster them by ``docs``. The seed is fixed
    for evaluation: every pipeline is scored on identical tokens (paired).
    ``layout='first'``: the first ``n`` consecutive windows of the joined text (ptqlib before).
    """
    import torch

    if layout not in WINDOW_LAYOUTS:
        raise ConfigError(f"ppl_windows: {layout!r} is not a layout; valid: {', '.join(WINDOW_LAYOUTS)}")
    if layout == "first":
        w = text_windows(tokenizer, "test", seq_len, n, source=source)
        return w, [-1] * len(w)  # -1: document not known (each window its own cluster)
    ids, doc_of = _document_ids(tokenizer, source)
    g = torch.Generator().manual_seed(seed)
    shift, n_slots = _slots(len(ids), seq_len, g)
    if n > n_slots:
        raise ConfigError(f"held-out {source} text has only {n_slots} windows of {seq_len} tokens; asked for {n}")
    slots = torch.randperm(n_slots, generator=g)[:n].sort().values.tolist()
    t = torch.tensor(ids, dtype=torch.long)
    starts = [shift + k * seq_len for k in slots]
    return with_bos(tokenizer, torch.stack([t[a:a + seq_len] for a in starts])), [doc_of[a + seq_len // 2] for a in starts]


def window_capacity(tokenizer, source: str, seq_len: int, layout: str, seed: int = 0) -> int:
    """How many windows :func:`held_out_windows` can cut for ``(source, seq_len, layout)`` with ``tokenizer``
    (``models.held_out_capacity`` keeps the count per model)."""
    import torch

    if layout == "first":
        return len(_joined_ids(tokenizer, "test", source)) // seq_len
    return _slots(len(_document_ids(tokenizer, source)[0]), seq_len, torch.Generator().manual_seed(seed))[1]
