"""Evaluation on the tiny model: per-window NLL, order-preserving sorted batching, per-example units."""
import math

import pytest
import torch

from ptqlib.data import load_task
from ptqlib.stages.evaluate import evaluate_model, generate, next_token_nll, perplexity, window_nll
from ptqlib.text import text_windows


def test_window_nll_is_the_models_own_loss(tiny):
    model, tok = tiny
    w = text_windows(tok, "test", 32, 6)
    units = window_nll(model, w, batch_size=4)
    assert len(units["nll"]) == 6 and units["tokens"] == [31.0] * 6
    with torch.no_grad():
        one = w[2:3].to(model.device)  # window_nll runs on CUDA where there is one (and moves the model)
        own = model(input_ids=one, labels=one).loss.item()  # mean NLL of one window
    assert units["nll"][2] / 31 == pytest.approx(own, rel=1e-4)
    assert perplexity(model, w, 4) == pytest.approx(math.exp(sum(units["nll"]) / (31 * 6)), rel=1e-6)


def test_next_token_nll_is_float64_close_at_a_real_vocabulary():
    """At SmolLM2's 49152-token vocabulary the per-token NLL is within 1e-5 nats of float64 (the
    transposed ``cross_entropy`` ptqlib used before was 7e-5-9e-5 away on these logits)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 49152, generator=g) * 3  # (b, T, vocab)
    y = torch.randint(0, 49152, (2, 64), generator=g)
    exact = -torch.log_softmax(logits.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    nll = next_token_nll(logits, y)
    assert nll.shape == (2, 64) and nll.dtype == torch.float32
    assert (nll.double() - exact).abs().max() < 1e-5


def test_window_nll_is_the_same_with_and_without_a_reference(tiny):
    """The KL path takes the NLL from its own log-softmax: the same bits as the plain path."""
    model, tok = tiny
    w = text_windows(tok, "test", 32, 6)
    assert window_nll(model, w, batch_size=4)["nll"] == window_nll(model, w, batch_size=4, reference=model)["nll"]


def test_sorted_batching_keeps_the_order(tiny):
    model, tok = tiny
    prompts = [e.prompt[: 40 + 37 * i] for i, e in enumerate(load_task("meetings", "test", 5))]  # unequal lengths
    one = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0][0] for p in prompts]
    batched, n_tok, secs = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == one and n_tok > 0 and secs > 0


def test_evaluate_keeps_units_that_give_back_the_metrics(tiny):
    from ptqlib.metrics import task_statistics

    model, tok = tiny
    ex = load_task("meetings-hard", "test", 3)
    metrics, rows, units = evaluate_model(model, tok, ex, ppl_samples=4, ppl_seq_len=32, max_new_tokens=4,
                                          batch_size=2, ppl_sources=("pydoc", "stdlib"))
    assert set(units) == {"ppl", "ppl_stdlib", "task"} and len(rows) == 3
    assert len(units["ppl_stdlib"]["nll"]) == 4 and len(units["task"]["field_f1"]) == 3
    assert metrics["ppl_stdlib"] == pytest.approx(math.exp(sum(units["ppl_stdlib"]["nll"]) / (4 * 31)))
    for name, st in task_statistics().items():
        den = units["task"][st.den] if st.den else None
        if den is None or sum(den):
            assert st(units["task"][st.num], den) == pytest.approx(metrics[name])
    assert metrics["task_examples"] == 3


def test_run_stage_is_evaluate_model_plus_the_models_size(tiny):
    """The stage's one call: the same numbers as evaluate_model, then size and parameter count."""
    from ptqlib import artifacts
    from ptqlib.stages.evaluate import run_stage
    from ptqlib.study.params import EvaluateParams

    model, tok = tiny
    ex = load_task("meetings-hard", "test", 2)
    p = EvaluateParams(ppl_samples=2, ppl_seq_len=32, ppl_sources=["stdlib"], task_samples=2, max_new_tokens=4,
                       batch_size=2).__dict__
    metrics, rows, units = run_stage(model, tok, "tiny", ex, p, output_dir=None)
    ref, _, _ = evaluate_model(model, tok, ex, 2, 32, 4, 2, ppl_sources=("stdlib",))
    assert {k: metrics[k] for k in ("ppl_stdlib", "field_f1", "exact_match")} == \
        {k: ref[k] for k in ("ppl_stdlib", "field_f1", "exact_match")}
    assert "ppl" not in metrics and len(rows) == 2 and set(units) == {"ppl_stdlib", "task"}
    assert metrics["model_params"] == sum(prm.numel() for prm in model.parameters())
    assert metrics["size_mb_deploy"] == artifacts.tensor_bytes(model, float_bytes=2) / 2**20
    assert metrics["size_mb_stored"] == artifacts.dir_bytes("tiny") / 2**20 > 0


def test_kl_against_the_reference_is_zero_for_itself_and_grows_with_quantization():
    """KL(P_ref || P_model) and top-1 agreement on the perplexity windows: 0 and 1 against the model
    itself; RTN 3-bit moves further from the float model than RTN 8-bit."""
    import copy

    from ptqlib.metrics import statistic
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model
    from ptqlib.stages.evaluate import evaluate_model

    model, tok = load_model("tiny")
    m, _, u = evaluate_model(model, tok, [], ppl_samples=4, ppl_seq_len=32, reference=model,
                             ppl_sources=("pydoc", "stdlib"))
    assert m["kl"] == pytest.approx(0, abs=1e-6) and m["top1_agree"] == 1.0 and m["kl_stdlib"] == pytest.approx(0, abs=1e-6)
    assert m["delta_p"] == 0 and m["kl_max"] == pytest.approx(0, abs=1e-6) and m["kl_p99_stdlib"] == pytest.approx(0, abs=1e-6)
    assert "kl_tokens" not in u["ppl"] and len(u["ppl"]["dp"]) == 4  # per window only in the units
    assert len(u["ppl"]["kl"]) == 4 and statistic("kl_stdlib").group == "ppl_stdlib"
    kl = {}
    for bits in (8, 3):
        q = copy.deepcopy(model)
        rtn_quantize_model(q, bits=bits, group_size=32, progress=False)
        mq, _, _ = evaluate_model(q, tok, [], ppl_samples=4, ppl_seq_len=32, reference=model)
        kl[bits] = mq["kl"]
        assert 0 < mq["kl"] and 0 < mq["top1_agree"] <= 1
        assert mq["kl_p50"] <= mq["kl_p90"] <= mq["kl_p99"] <= mq["kl_max"] and mq["kl_max"] > mq["kl"]
    assert kl[3] > 10 * kl[8]


def test_the_runner_passes_the_input_of_the_first_quantizing_stage_as_reference(tmp_path):
    from ptqlib.study.graph import build_graph
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\ndefaults:\n  quantize: {group_size: 32}\npipelines:\n  base: []\n"
                 "  q: [{finetune: full}, {quantize: rtn}, {finetune: qlora}]\n  l4q: [{finetune: l4q}]\n"
                 "  ll: [{quantize: rtn}, {evaluate: {runtime: llama.cpp}}]\n"
                 "  llkl: [{quantize: rtn}, {evaluate: {runtime: llama.cpp, kl_reference: true}}]\n")
    study = load_study(f)
    nodes, chains = build_graph(study)
    ev = {n: nodes[c[-1]] for n, c in chains.items()}
    assert ev["base"].reference is None and not ev["base"].params["kl_reference"]
    assert ev["q"].reference == chains["q"][0] and ev["q"].params["kl_reference"]  # the fine-tuned float model
    assert ev["l4q"].reference == "" and ev["l4q"].params["kl_reference"]  # the model itself
    assert not ev["ll"].params["kl_reference"]  # llama.cpp: off unless the study asks (the ids made before)
    assert ev["llkl"].params["kl_reference"] and ev["llkl"].reference == ""  # asked: against the model itself


def test_chunked_scoring_gives_the_bits_of_the_whole_tensor():
    """NLL, KL and top-1 agreement scored LOGIT_ROWS positions at a time equal, bit for bit, the same
    formulas over the whole (b, L-1, vocab) tensor, for float32 and bf16 logits at a real vocabulary."""
    from types import SimpleNamespace

    from ptqlib.stages import evaluate

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.logits[: len(input_ids)])

    g = torch.Generator().manual_seed(0)
    b, L, V = 3, 2 * evaluate.LOGIT_ROWS + 7, 49152  # several chunks per window, the last one short
    x = torch.randint(0, V, (b, L), generator=g)
    for dt in (torch.float32, torch.bfloat16):
        lg, rf = ((torch.randn(b, L, V, generator=g) * 3).to(dt) for _ in range(2))
        lp = torch.log_softmax(lg[:, :-1].float(), -1)
        lr = torch.log_softmax(rf[:, :-1].float(), -1)
        nll = -lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        out = evaluate.window_nll(Fixed(lg), x, reference=Fixed(rf))
        assert out["nll"] == nll.sum(1).tolist()
        assert out["kl"] == (lr.exp() * (lr - lp)).sum(-1).sum(1).tolist()
        assert out["top1"] == (lr.argmax(-1) == lp.argmax(-1)).sum(1).float().tolist()
        kl_pos = (lr.exp() * (lr - lp)).sum(-1)
        assert out["kl_tokens"] == kl_pos.flatten().tolist()  # every position's KL, for its quantiles
        dp = lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).exp() - lr.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1).exp()
        assert torch.allclose(torch.tensor(out["dp"]), dp.sum(1), atol=1e-5)  # Delta-p summed per window
        q = evaluate.kl_quantiles(out["kl_tokens"], "_x")
        t = kl_pos.flatten().double()
        assert q == pytest.approx({"kl_p50_x": float(t.median() if len(t) % 2 else t.quantile(0.5)),
                                   "kl_p90_x": float(t.quantile(0.9)), "kl_p99_x": float(t.quantile(0.99)),
                                   "kl_max_x": float(t.max())})
        assert q["kl_p50_x"] <= q["kl_p90_x"] <= q["kl_p99_x"] <= q["kl_max_x"]
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        assert torch.equal(evaluate.next_token_nll(lg[:, :-1], x[:, 1:]), ce.view(b, L - 1))
        assert evaluate.window_nll(Fixed(lg), x)["nll"] == out["nll"]


def test_task_units_carry_the_examples_documents_where_the_task_has_them(tiny):
    """stdlib-docstrings examples come from modules: their units carry ``doc`` (the claims' interval clusters by
    it, as perplexity's does by document); a generated task's units have none."""
    model, tok = tiny
    ex = load_task("stdlib-docstrings", "test", 4)
    _, _, units = evaluate_model(model, tok, ex, ppl_samples=0, ppl_seq_len=32, max_new_tokens=2, batch_size=4,
                                ppl_sources=())
    assert units["task"]["doc"] == [float(e.doc) for e in ex] and min(units["task"]["doc"]) >= 0
    _, _, units = evaluate_model(model, tok, load_task("meetings", "test", 2), ppl_samples=0, ppl_seq_len=32, ppl_sources=(),
                                 max_new_tokens=2, batch_size=2)
    assert "doc" not in units["task"]
