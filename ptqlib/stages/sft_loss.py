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
every weight after the step (``tests/test_sft_loss.py``). Only the reported loss value may differ in
its last bits: it is a sum over fewer terms, in another order. ``lm_head`` itself still runs on every
row: skipping rows there would reorder the sum over tokens in its weight gradient.

Semantics are transformers': ``labels`` are the input ids (shifted here by one: position ``t``
predicts label ``t + 1``); with ``num_items_in_batch`` (Trainer passes the labelled tokens of the
whole accumulated batch) the sum is divided by it, else the mean over labelled tokens is taken.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def causal_lm_loss(outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy over labelled positions; Trainer's ``compute_loss_func`` signature."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]  # (B, L, V), autocast's dtype
    V = logits.shape[-1]
    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(logits.device)  # (B*L,)
    keep = (target != ignore_index).nonzero().squeeze(1)  # (n,) rows that carry a label
    source = logits.reshape(-1, V).index_select(0, keep).float()  # (n, V) fp32, as transformers' loss
    if num_items_in_batch is None:
        return F.cross_entropy(source, target[keep], reduction="mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(source.device)
    return F.cross_entropy(source, target[keep], reduction="sum") / num_items_in_batch
