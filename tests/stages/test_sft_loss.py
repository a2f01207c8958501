"""The labelled-rows loss trains exactly as transformers' own causal-LM loss does."""
from __future__ import annotations

import copy

import pytest
import torch

from ptqlib import precision
from ptqlib.stages.sft_loss import causal_lm_loss
from ptqlib.study.params import FinetuneParams


def test_loss_and_logit_gradient_equal_transformers():
    """Same loss (to rounding) and the same gradient w.r.t. the logits, bit for bit, in fp32 and bf16."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 12), generator=g)
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding at the end of a shorter row
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(3, 12, 50, generator=g).to(dtype)
        grads, losses = [], []
        for n_items in (None, torch.tensor(9)):
            for ours in (True, False):
                logits = base.clone().requires_grad_(True)
                if ours:
                    loss = causal_lm_loss({"logits": logits}, labels, num_items_in_batch=n_items)
                else:
                    loss = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=n_items)
                loss.backward()
                grads.append(logits.grad)
                losses.append(loss.detach())
        for a, b in ((0, 1), (2, 3)):
            assert torch.equal(grads[a], grads[b]), dtype
            torch.testing.assert_close(losses[a], losses[b], rtol=1e-6, atol=0)
        assert grads[0].abs().sum() > 0 and not grads[0][:, :6].any()  # rows without a label get none


@pytest.mark.parametrize("method", ["full", "qlora", "l4q", "qablora"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_training_gives_the_same_weights_as_the_models_own_loss(tiny, monkeypatch, method, prec):
    """Three Trainer steps (2 x 2 accumulated) on ptqlib's path and on transformers' own (the model's
    loss; accelerate's autocast under bf16): every trainable weight equal afterwards, bit for bit in
    fp32; in bf16, where the head runs on the labelled rows only, to a rounding-level difference."""
    from ptqlib.data import load_task, sft_features
    from ptqlib.quant import rtn_quantize_model
    from ptqlib.stages import finetune

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, tok = tiny
    if method in ("qlora", "qablora"):  # adapters on a 4-bit base
        model = copy.deepcopy(model)
        rtn_quantize_model(model, bits=4, group_size=32, progress=False)
    feats = sft_features(tok, load_task("meetings", "train", 8), 128)
    p = FinetuneParams(method=method, steps=3, batch_size=2, grad_accum=2, lr=1e-3, precision=prec)
    weights, losses = [], []
    for labelled_loss in (True, False):
        m = finetune.prepare(copy.deepcopy(model), method, p)
        res = finetune.train(m, tok, feats, p, seed=0, labelled_loss=labelled_loss)
        weights.append({k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad})
        losses.append([l for _, l in res["loss_history"]])
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for k in weights[0]:
        if prec == "fp32":
            assert torch.equal(weights[0][k], weights[1][k]), k
        else:  # 3 steps at lr 1e-3 move a weight by ~3e-3; rounding-level reordering far less
            torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-5)
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    if method != "full":  # the head's frozen weight went back: still tied to the input embedding
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert m.get_output_embeddings().weight.dtype == torch.float32


def test_labelled_rows_head_gives_those_rows_logits(tiny):
    """Inside LabelledRowsHead the model returns the logits of the kept rows only, equal to those
    rows of the full logits up to the matmul's rounding; the frozen head weight is cast once and
    the original parameter (tied to the embedding) is back afterwards."""
    from ptqlib.stages.sft_loss import LabelledRowsHead, shifted_targets

    model, _ = tiny
    model = copy.deepcopy(model).cpu()  # the head's logic under CPU autocast (the fixture sits on CUDA where there is one)
    model.requires_grad_(False)
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    _, keep = shifted_targets(labels)
    assert keep.tolist() == [5, 6, 7, 8, 15, 16, 17, 18]  # t predicts t + 1; the last has no target
    tied = model.get_output_embeddings().weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids).logits.reshape(-1, model.config.vocab_size)
        with LabelledRowsHead(model, torch.bfloat16) as rows:
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
            rows.keep = keep
            part = model(input_ids=ids).logits
    assert part.shape == (len(keep), model.config.vocab_size)
    torch.testing.assert_close(part.float(), full[keep].float(), rtol=0.02, atol=0.02)
    assert model.get_output_embeddings().weight is tied is model.get_input_embeddings().weight
