"""The 16-bit reference of a KL evaluation, computed once per study and machine: its final hidden states cached.

Every evaluate stage that measures ``KL(P_ref || P_model)`` (``evaluate.window_nll`` with a reference) ran
the reference model over the same perplexity windows again: in the default study six stages per seed share
one reference (the seed's 16-bit fine-tuned model), and its forward was half of each stage's perplexity
pass (8 of 17 s per source, bf16, SmolLM2, 32 x 256 tokens, 2-core AMD Zen 4). The exact KL needs the
reference's whole next-token distribution, and its logits (b x 256 x 49152 per batch) are too large to
keep; its final hidden states (b x 256 x 576) are not. :class:`CachedReference` keeps them on disk, one
file per batch of windows, and gives the logits as the output layer of those states: the matmul the
reference's forward ends with, on the same input, so the same bits. That is checked once per reference
and machine (the output layer on the hidden states against the whole forward, bit for bit; a marker file
records it), and where a model's forward does more than that (a soft-capping, a scale) the whole forward
runs every time instead, with one warning.

A cache file is keyed by the batch's token ids, the reference's dtype and device, the torch version and the
CPU (bf16 matmuls round differently on AMX and AVX512-BF16), so a hit is the reference's own output here.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import torch

from ptqlib.engine.record import cpu_model
from ptqlib.files import write_atomic

log = logging.getLogger(__name__)


class CachedReference:
    """A reference model whose final hidden states on each batch of windows are kept in ``cache_dir``.

    ``logits(x)`` -> the reference's logits (b, L, vocab) on ``x`` (b, L): from a cached file when there is
    one, else from its forward (whose hidden states are then saved). ``hits`` / ``misses`` count the batches.
    """

    def __init__(self, model, cache_dir: str | Path):
        self.model, self.dir = model, Path(cache_dir)
        self.exact: bool | None = None  # None: not yet checked in this process
        self.hits = self.misses = 0
        self.device = next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        # what a cached file's bits depend on besides its tokens (read once, not per batch)
        self.context = f"{type(model).__name__}|{dtype}|{self.device.type}|{torch.__version__}|{cpu_model()}"

    def _key(self, x: torch.Tensor) -> str:
        h = hashlib.sha256(x.cpu().numpy().tobytes())
        h.update(f"{tuple(x.shape)}|{self.context}".encode())
        return h.hexdigest()[:32]

    def _marker(self) -> Path:
        """Written once a forward here was checked to be its output layer on its hidden states."""
        return self.dir / f"exact-{hashlib.sha256(self.context.encode()).hexdigest()[:16]}"

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's whole forward -> (logits (b, L, vocab), the output layer's input (b, L, hidden))."""
        seen: dict[str, torch.Tensor] = {}
        head = self.model.get_output_embeddings()

        def keep(mod, args, out) -> None:  # returns None: a hook's return value would replace the logits
            seen["h"] = args[0]

        hook = head.register_forward_hook(keep)
        try:
            logits = self.model(input_ids=x).logits
        finally:
            hook.remove()
        return logits, seen["h"]

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.exact is False:
            return self.model(input_ids=x).logits
        path = self.dir / f"{self._key(x)}.pt"
        try:
            h = torch.load(path, map_location=self.device, weights_only=True)
        except Exception:  # absent or unreadable (torch.load raises many kinds): the forward, then saved
            logits, h = self._forward(x)
            self._check(logits, h)
            if self.exact:
                self._save(path, h)
            return logits
        self.hits += 1
        logits = self.model.get_output_embeddings()(h)
        if self.exact is None and self._marker().exists():  # checked by the stage that wrote the cache
            self.exact = True
        if self.exact is None:  # a hit with no check on record: check it once against a whole forward
            whole, _ = self._forward(x)
            self._check(whole, h)
            return whole
        return logits

    def _check(self, logits: torch.Tensor, h: torch.Tensor) -> None:
        """Once per process: are the logits the output layer of ``h``, bit for bit?"""
        if self.exact is not None:
            return
        self.exact = torch.equal(self.model.get_output_embeddings()(h), logits)
        if self.exact:
            try:
                os.makedirs(self.dir, exist_ok=True)
                write_atomic(self._marker(), self.context)
            except OSError as e:
                log.warning("reference cache %s not written: %s", self.dir, e)
        if not self.exact:
            log.warning("the reference's logits are not its output layer on its last hidden states (%s): "
                        "its whole forward runs in every evaluate stage", type(self.model).__name__)

    def _save(self, path: Path, h: torch.Tensor) -> None:
        self.misses += 1
        buf = io.BytesIO()
        torch.save(h.cpu().contiguous(), buf)
        try:
            os.makedirs(self.dir, exist_ok=True)
            write_atomic(path, buf.getvalue())
        except OSError as e:  # a cache that cannot be written costs time, not results
            log.warning("reference cache %s not written: %s", self.dir, e)


def cache_dir(reference: str | Path) -> Path:
    """Where the cached hidden states of ``reference`` (a stage's run directory or a model name) live:
    beside the run directories (``<runs>/.reference/<stage id>``), or under ptqlib's model cache."""
    p = Path(reference)
    if p.is_dir() and p.parent.name:
        return p.parent / ".reference" / p.name
    from ptqlib.models import cache_dir as models_cache

    return models_cache() / "reference" / str(reference).replace("/", "--")
