"""The fine-tuning loss, taken only over the tokens that carry a label.

SFT masks the prompt (labels ``-100``): in the default study 81% of a batch's tokens carry no label,
yet transformers' ``ForCausalLMLoss`` casts every position's logits to fp32 and runs the
log-softmax over the whole ``(B, L, vocab)`` tensor (49k columns for SmolLM2), forward and backward.
:func:`causal_lm_loss` selects the labelled rows first, so the cast, the log-softmax and their
backward see only those (about 20% of the step's time under bf16 autocast on CPU went to the rest).

Why this is the same training, bit for bit: an ignored row's gradient through
``log_softmax -> nll_loss`` is exactly zero in transformers' loss, and the backward of the row
selection writes exactly zero there too; a labelled row's log-softmax and its gradient are row-wise,
so equal; the ``(B, L, vocab)`` gradient reaching ``lm_head`` is therefore the same tensor, and so is
every weight after the step (``tests/stages/test_sft_loss.py``). Only the reported loss value may differ in
its last bits: it is a sum over fewer terms, in another order.

Under bf16 the head itself runs on the labelled rows only (:class:`LabelledRowsHead`): its matmul, the
``(B, L, vocab)`` logits and their zero-filled gradient shrink to the labelled share (17% of the rows in
the default study). That is the same arithmetic, but not bit for bit: a matmul over fewer rows may
block its sums differently (a few units in the last place of a logit), and the tied head's weight
gradient sums fewer zero rows. fp32 keeps every row, so its weights stay those of transformers' path
and of every run before; bf16's own rounding is far larger than the reordering.

Semantics are transformers': ``labels`` are the input ids (shifted here by one: position ``t``
predicts label ``t + 1``); with ``num_items_in_batch`` (Trainer passes the labelled tokens of the
whole accumulated batch) the sum is divided by it, else the mean over labelled tokens is taken.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def shifted_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(target (B*L,), keep (n,))``: position ``t``'s label is ``labels[t + 1]``; ``keep`` indexes
    the flattened positions that carry one."""
    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    return target, (target != ignore_index).nonzero().squeeze(1)


def causal_lm_loss(outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy over labelled positions; Trainer's ``compute_loss_func`` signature.

    ``outputs.logits``: ``(B, L, V)``, or ``(n, V)`` when :class:`LabelledRowsHead` already kept only
    the labelled rows (in ``keep``'s order); autocast's dtype."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    V = logits.shape[-1]
    target, keep = shifted_targets(labels.to(logits.device), ignore_index)
    if logits.dim() == 2:  # the head ran on the labelled rows only
        source = logits.float()
    else:
        source = logits.reshape(-1, V).index_select(0, keep).float()  # (n, V) fp32, as transformers' loss
    if num_items_in_batch is None:
        return F.cross_entropy(source, target[keep], reduction="mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(source.device)
    return F.cross_entropy(source, target[keep], reduction="sum") / num_items_in_batch


class LabelledRowsHead:
    """While entered, the model's output head computes logits only for the rows in :attr:`keep`.

    A forward pre-hook hands the head ``hidden.reshape(-1, H)[keep]`` (set per batch from the labels by
    the trainer; ``None`` leaves the head alone), so the model returns ``(n, V)`` logits. Under
    autocast (``dtype``) a frozen ``nn.Linear`` head (adapter methods: the head does not train) gets its
    weight cast once for the whole run instead of by autocast at every step, the same values;
    the original parameter, and so any tie to the input embedding, is put back on exit.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.head = model.get_output_embeddings()
        self.dtype = dtype
        self.keep: Tensor | None = None
        self._hook = None
        self._weight: nn.Parameter | None = None

    def _select(self, module: nn.Module, args: tuple):
        if self.keep is None:
            return None
        h = args[0]  # (B, L, H)
        return (h.reshape(-1, h.shape[-1]).index_select(0, self.keep.to(h.device)), *args[1:])

    def __enter__(self) -> "LabelledRowsHead":
        self._hook = self.head.register_forward_pre_hook(self._select)
        w = getattr(self.head, "weight", None)
        if (self.dtype is not None and isinstance(self.head, nn.Linear) and not w.requires_grad
                and w.dtype != self.dtype):
            self._weight = w
            self.head.weight = nn.Parameter(w.detach().to(self.dtype), requires_grad=False)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        if self._weight is not None:
            self.head.weight = self._weight
            self._weight = None
        self.keep = None
