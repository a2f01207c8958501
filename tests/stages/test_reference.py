"""The KL reference's cached hidden states: the same KL, NLL and top-1, bit for bit, from the second stage on."""
import logging

import torch

from ptqlib.stages.evaluate import window_nll
from ptqlib.stages.reference import CachedReference, cache_dir
from ptqlib.text import text_windows
from ptqlib.tiny import build_tiny_model


def _quantized_copy(model):
    """``model`` with its matrices rounded to 3 significant bits: a model that differs from its reference."""
    q = build_tiny_model(seed=0)
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in q.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(1, keepdim=True).clamp_min(1e-6) / 4
                p.copy_((p / scale).round() * scale)
    return q


def test_a_cached_reference_gives_the_whole_forwards_kl_bit_for_bit(tiny, tmp_path):
    model, tok = tiny
    w = text_windows(tok, "test", 32, 10)
    quant = _quantized_copy(model)
    plain = window_nll(quant, w, batch_size=4, reference=model)
    first = CachedReference(model, tmp_path)
    assert window_nll(quant, w, batch_size=4, reference=first) == plain
    assert first.exact and first.misses == 3 and len(list(tmp_path.glob("*.pt"))) == 3  # 10 windows, batches of 4
    later = CachedReference(model, tmp_path)  # another stage, another process: from the files
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        assert window_nll(quant, w, batch_size=4, reference=later) == plain and plain["kl"][0] > 0
    finally:
        hook.remove()
    assert later.hits == 3 and later.misses == 0 and not forwards  # the first stage's check stands
    for marker in tmp_path.glob("exact-*"):
        marker.unlink()
    unchecked = CachedReference(model, tmp_path)  # no check on record: one whole forward checks the files
    assert window_nll(quant, w, batch_size=4, reference=unchecked) == plain and unchecked.exact


def test_a_damaged_cache_file_is_recomputed(tiny, tmp_path):
    model, tok = tiny
    w = text_windows(tok, "test", 32, 4)
    plain = window_nll(model, w, batch_size=4, reference=model)
    window_nll(model, w, batch_size=4, reference=CachedReference(model, tmp_path))
    (f,) = tmp_path.glob("*.pt")
    f.write_bytes(b"not a tensor")
    again = CachedReference(model, tmp_path)
    assert window_nll(model, w, batch_size=4, reference=again) == plain and again.misses == 1
    assert torch.load(f, weights_only=True).shape == (4, 32, model.config.hidden_size)


def test_a_forward_that_is_more_than_its_output_layer_is_run_whole(tmp_path, caplog):
    """Soft-capped logits (Gemma 2's ``final_logit_softcapping``) are not the output layer of the last hidden
    states: the reference then runs its whole forward every time, and says so once."""
    ref = build_tiny_model(seed=0, arch="gemma3")
    ref.config.final_logit_softcapping = 0.5  # strong enough to change every logit
    w = torch.randint(4, ref.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    quant = _quantized_copy_of(ref)
    plain = window_nll(quant, w, batch_size=4, reference=ref)
    cached = CachedReference(ref, tmp_path)
    with caplog.at_level(logging.WARNING, logger="ptqlib.stages.reference"):
        assert window_nll(quant, w, batch_size=4, reference=cached) == plain
    assert cached.exact is False and not list(tmp_path.glob("*.pt"))
    assert "its whole forward runs" in caplog.text


def _quantized_copy_of(ref):
    q = build_tiny_model(seed=0, arch="gemma3")
    q.config.final_logit_softcapping = ref.config.final_logit_softcapping
    q.load_state_dict(ref.state_dict())
    with torch.no_grad():
        q.lm_head.weight.mul_(1.5) if q.lm_head.weight is not q.model.embed_tokens.weight else None
        for p in q.model.layers[0].parameters():
            p.add_(0.05)
    return q


def test_the_key_holds_the_dtype_and_the_cache_sits_beside_the_runs(tiny, tmp_path):
    model, tok = tiny
    x = text_windows(tok, "test", 16, 2)
    a = CachedReference(model, tmp_path)._key(x)
    b16 = build_tiny_model(seed=0).to(torch.bfloat16)
    assert CachedReference(b16, tmp_path)._key(x) != a and CachedReference(model, tmp_path)._key(x) == a
    assert CachedReference(model, tmp_path)._key(x[:1]) != a
    stage = tmp_path / "runs" / "finetune-abc123"
    stage.mkdir(parents=True)
    assert cache_dir(stage) == tmp_path / "runs" / ".reference" / "finetune-abc123"
    assert cache_dir("smollm2-135m").name == "smollm2-135m"


def test_the_evaluate_stage_caches_its_reference_beside_the_runs(tiny, tmp_path):
    """run_stage with a reference stage's run directory: the hidden states land in ``runs/.reference/<id>``,
    and a second stage against it gives the first one's KL, top-1 and NLL (and those of the uncached path)."""
    from ptqlib.stages.evaluate import evaluate_model, run_stage
    from ptqlib.study.params import EvaluateParams

    model, tok = tiny
    ref_dir = tmp_path / "runs" / "finetune-0123456789ab"
    model.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    quant = _quantized_copy(model)
    p = EvaluateParams(ppl_samples=3, ppl_seq_len=32, ppl_sources=["pydoc"], task_samples=0,
                       precision="fp32").__dict__
    first = run_stage(quant, tok, "tiny", [], p, output_dir=None, reference=str(ref_dir))[0]
    cached = sorted((tmp_path / "runs" / ".reference" / ref_dir.name).glob("*.pt"))
    assert cached and not list(ref_dir.glob("*.pt"))  # beside the runs, not inside the reference's own directory
    second = run_stage(quant, tok, "tiny", [], p, output_dir=None, reference=str(ref_dir))[0]
    plain = evaluate_model(quant, tok, [], 3, 32, reference=model, ppl_windows=p["ppl_windows"])[0]
    for k in ("kl", "top1_agree", "ppl", "delta_p", "kl_max"):
        assert first[k] == second[k] == plain[k], k
    assert first["kl"] > 0
