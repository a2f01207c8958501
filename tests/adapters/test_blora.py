"""Balanced adapters (Q-BLoRA, QA-LoRA, QA-BLoRA): dense equivalence, parameter budget,
exact low-bit merge, errors, save/load, and a short training run on the tiny model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqlib.adapters.balanced import BalancedLoRA, QBLoRALinear, balanced_rank
from ptqlib.adapters.blora import (
    adapter_layers,
    apply_adapter,
    count_trainable,
    load_adapters,
    lora_param_count,
    merge_adapters,
    save_adapters,
)
from ptqlib.quant import QuantLinear, rtn_quantize_model
from ptqlib.quant.uniform import rtn_quantize

IN, OUT = 128, 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These layers are tiny: on a shared 2-core machine two OpenMP threads mostly wait on each
    other (10x slower steps under load), so run this module single-threaded and restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize(adapter: BalancedLoRA, seed: int = 0) -> None:
    """B starts at 0 (a no-op adapter); give it values so the tests see a real dW."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)


def _quant_base(bits: int, group_size: int, device, sym: bool = False, g_idx=None, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.05
    codes, scales, zeros = rtn_quantize(w, bits, group_size, sym)
    bias = torch.randn(OUT, generator=g) * 0.1
    return QuantLinear.from_codes(codes, scales, zeros, g_idx=g_idx, bias=bias, bits=bits, group_size=group_size).to(device)


def _adapted(kind: str, rank: int = 4) -> nn.Module:
    from ptqlib.tiny import build_tiny_model

    model = build_tiny_model(seed=0)
    rtn_quantize_model(model, bits=4, group_size=32)
    return apply_adapter(model, kind, rank=rank, alpha=2 * rank)


# ---- the adapter itself ---------------------------------------------------------------------
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("pool,repeat", [(2, 2), (4, 8), (32, 1), (64, 2)])
def test_dense_equivalence(device, pool, repeat, fold):
    """Both ways of computing pool / repeat (folded into the weights, or on the activations)."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(device)
    layer = QBLoRALinear(base, rank=4, alpha=8, pool=pool, repeat=repeat, fold=fold)
    _randomize(layer.adapter)
    a = layer.adapter
    dw = layer.delta_weight()
    # dW[i, k] = (s / p) * (B A)[i // k_rep, k // p], written out with index arithmetic
    ba = (a.lora_B @ a.lora_A).detach()
    rows = torch.arange(OUT, device=device) // repeat
    cols = torch.arange(IN, device=device) // pool
    assert torch.allclose(dw, (a.scale / pool) * ba[rows][:, cols], atol=1e-7)
    x = torch.randn(3, 7, IN, device=device)
    ref = x @ (base.weight + dw).T + base.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(a(x), x @ dw.T, atol=1e-5)
    # gradients agree with the dense form too
    x.requires_grad_(True)
    layer(x).square().sum().backward()
    g_fast = (x.grad.clone(), a.lora_A.grad.clone(), a.lora_B.grad.clone())
    x.grad = a.lora_A.grad = a.lora_B.grad = None
    (x @ (base.weight + a.delta_weight()).T + base.bias).square().sum().backward()
    for got, want in zip(g_fast, (x.grad, a.lora_A.grad, a.lora_B.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_init_is_noop_and_only_adapter_trains():
    base = nn.Linear(IN, OUT)
    layer = QBLoRALinear(base, rank=4, alpha=8)
    x = torch.randn(2, IN)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"adapter.lora_A", "adapter.lora_B"}


def test_param_count_matches_lora():
    r = 8
    # p = k = 2: r' = 2r exactly, so the count equals LoRA-r's
    a = BalancedLoRA(IN, OUT, r, 16, pool=2, repeat=2)
    assert a.rank_eff == 2 * r
    assert a.num_parameters() == lora_param_count(IN, OUT, r)
    # p = 32, k = 2: r (in + out) / (in/p + out/k) = 3072 / 132 is not an integer -> rounded down
    a = BalancedLoRA(IN, OUT, r, 16, pool=32, repeat=2)
    assert a.rank_eff == balanced_rank(IN, OUT, r, 32, 2) == 23
    budget = lora_param_count(IN, OUT, r)
    assert budget - (IN // 32 + OUT // 2) < a.num_parameters() <= budget  # within one rank's worth
    # QA-LoRA as published keeps r (fewer parameters than LoRA)
    a = BalancedLoRA(IN, OUT, r, 16, pool=32, repeat=1, match_params=False)
    assert a.rank_eff == r and a.num_parameters() == r * (IN // 32 + OUT)


def test_model_trainable_count_equals_lora():
    model = _adapted("qblora", rank=4)
    layers = adapter_layers(model)
    assert len(layers) == 14  # 7 linears x 2 decoder layers, lm_head untouched
    lora = sum(lora_param_count(m.in_features, m.out_features, 4) for m in layers.values())
    assert count_trainable(model) == lora


def test_divisibility_errors():
    with pytest.raises(ValueError, match=r"'model.layers.0.q_proj'.*in_features=100.*pool factor 32"):
        BalancedLoRA(100, OUT, 4, 8, pool=32, repeat=2, name="model.layers.0.q_proj")
    with pytest.raises(ValueError, match=r"out_features=256.*repeat factor 3"):
        BalancedLoRA(IN, OUT, 4, 8, pool=2, repeat=3)
    from ptqlib.tiny import build_tiny_model

    with pytest.raises(ValueError, match=r"pool factor 48"):
        apply_adapter(build_tiny_model(), "qblora", 4, 8, pool=48)
    with pytest.raises(ValueError, match="pass pool= explicitly"):
        apply_adapter(build_tiny_model(), "qalora", 4, 8)  # nn.Linear base: no group size to pool over


@pytest.mark.parametrize("fold", [True, False])
def test_sum_pool_is_mean_pool_at_alpha_times_p(fold):
    """pool_norm="sum" (QA-LoRA's Algorithm 1) is the same function as the mean pool (the official
    code) at alpha x p, and its dW sums each block: dW = s (B A)[i // k, j // p]."""
    p, k = 32, 2
    sum_ = BalancedLoRA(IN, OUT, 4, 8, pool=p, repeat=k, pool_norm="sum", fold=fold)
    mean = BalancedLoRA(IN, OUT, 4, 8 * p, pool=p, repeat=k, fold=fold)
    mean.load_state_dict(sum_.state_dict())
    _randomize(sum_), _randomize(mean)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(sum_(x), mean(x), rtol=1e-5, atol=1e-6)
    pooled_sum = x.unflatten(-1, (IN // p, p)).sum(-1)  # (.., in/p): the block sums
    want = (pooled_sum @ sum_.lora_A.t() @ sum_.lora_B.t()).repeat_interleave(k, dim=-1) * (8 / 4)
    torch.testing.assert_close(sum_(x), want, rtol=1e-5, atol=1e-6)
    # the same adapter weights under the mean pool give 1/p of the sum pool's output
    mean_same_alpha = BalancedLoRA(IN, OUT, 4, 8, pool=p, repeat=k, fold=fold)
    mean_same_alpha.load_state_dict(sum_.state_dict())
    torch.testing.assert_close(mean_same_alpha(x) * p, sum_(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"pool_norm 'max' is not one of mean, sum"):
        BalancedLoRA(IN, OUT, 4, 8, pool=p, pool_norm="max")


@pytest.mark.parametrize("kind", ["qalora", "qablora"])
def test_sum_pool_merges_exactly_and_saves(tmp_path, device, kind):
    base = _quant_base(4, 32, device)
    layer = QBLoRALinear.for_kind(base, kind, rank=4, alpha=8, pool_norm="sum")
    _randomize(layer.adapter)
    x = torch.randn(4, 9, IN, device=device)
    torch.testing.assert_close(layer.merge()(x), layer(x), atol=2e-5, rtol=1e-5)
    # model level: the saved config carries pool_norm, so a load reproduces the outputs, and a
    # model wrapped with the other norm is refused (its scale would be off by the pool factor)
    from ptqlib.tiny import build_tiny_model

    def fresh():
        m = build_tiny_model(seed=0)
        rtn_quantize_model(m, bits=4, group_size=32)
        return m

    model = apply_adapter(fresh(), kind, rank=4, alpha=8, pool_norm="sum")
    for i, m in enumerate(adapter_layers(model).values()):
        _randomize(m.adapter, seed=i)
    save_adapters(model, tmp_path / "ad")
    loaded = load_adapters(fresh(), tmp_path / "ad")
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    with pytest.raises(ValueError, match=r"pool_norm 'mean' differs from the saved 'sum'"):
        load_adapters(apply_adapter(fresh(), kind, rank=4, alpha=8), tmp_path / "ad")


# ---- exact merge into the low-bit layer -------------------------------------------------------
@pytest.mark.parametrize("kind", ["qalora", "qablora"])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_merge_equals_base_plus_adapter(device, kind, group_size, bits):
    base = _quant_base(bits, group_size, device)
    layer = QBLoRALinear.for_kind(base, kind, rank=4, alpha=8)
    assert layer.adapter.pool == group_size
    _randomize(layer.adapter, seed=bits)
    merged = layer.merge()
    assert isinstance(merged, QuantLinear) and merged.float_zeros and merged.bits == bits
    assert torch.equal(merged.unpack_codes(), base.unpack_codes())  # only zero points change
    x = torch.randn(4, 9, IN, device=device)
    want = layer(x)
    assert (want - base(x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged(x), want, atol=2e-5, rtol=1e-5)


def test_merge_sym_grid_and_relabelled_groups(device):
    """Symmetric grid, and a g_idx whose group labels are permuted but contiguous (static
    groups): the fold must follow g_idx, not assume group c = columns c*g..(c+1)*g."""
    g = 32
    perm = torch.tensor([2, 0, 3, 1])
    w = torch.randn(OUT, IN) * 0.05
    codes, scales, zeros = rtn_quantize(w, 4, g, sym=True)
    inv = torch.argsort(perm)  # label perm[j] holds contiguous block j
    g_idx = perm[torch.arange(IN) // g]
    base = QuantLinear.from_codes(codes, scales[:, inv], zeros[:, inv], g_idx=g_idx, bits=4, group_size=g).to(device)
    again = QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=g).to(device)
    assert torch.allclose(base.dequantize_weight(), again.dequantize_weight())
    layer = QBLoRALinear.for_kind(base, "qablora", rank=4, alpha=8)
    _randomize(layer.adapter)
    x = torch.randn(5, IN, device=device)
    torch.testing.assert_close(layer.merge()(x), layer(x), atol=2e-5, rtol=1e-5)


def test_merge_errors(device):
    base = _quant_base(4, 32, device)
    with pytest.raises(ValueError, match="Q-BLoRA .* cannot be merged exactly"):
        QBLoRALinear.for_kind(base, "qblora", 4, 8).merge()
    with pytest.raises(ValueError, match="pool factor 16 is not a multiple of the quantization group size 32"):
        QBLoRALinear.for_kind(base, "qalora", 4, 8, pool=16).merge()
    # act-order without static groups: a group's columns are scattered over the input
    g_idx = torch.randperm(IN, generator=torch.Generator().manual_seed(0)) // 32
    scattered = _quant_base(4, 32, device, g_idx=g_idx)
    with pytest.raises(ValueError, match="spans several pooling blocks"):
        QBLoRALinear.for_kind(scattered, "qalora", 4, 8).merge()
    with pytest.raises(ValueError, match="needs a uniform QuantLinear base"):
        QBLoRALinear.for_kind(nn.Linear(IN, OUT), "qalora", 4, 8, pool=32).merge()
    model = _adapted("qblora")
    with pytest.raises(ValueError, match="Q-BLoRA"):
        merge_adapters(model)
    assert adapter_layers(model)  # nothing swapped on error


def test_merged_dense_for_qblora(device):
    base = _quant_base(4, 32, device)
    layer = QBLoRALinear.for_kind(base, "qblora", 4, 8)
    _randomize(layer.adapter)
    x = torch.randn(3, IN, device=device)
    torch.testing.assert_close(layer.merged_dense()(x), layer(x), atol=2e-5, rtol=1e-5)


# ---- save / load ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qblora", "qablora"])
def test_save_load_roundtrip(tmp_path, kind):
    model = _adapted(kind)
    for i, m in enumerate(adapter_layers(model).values()):
        _randomize(m.adapter, seed=i)
    save_adapters(model, tmp_path / "ad")
    fresh = _adapted(kind) if kind == "qblora" else None
    if fresh is None:  # also the path where the model is wrapped from the saved config
        from ptqlib.tiny import build_tiny_model

        fresh = build_tiny_model(seed=0)
        rtn_quantize_model(fresh, bits=4, group_size=32)
    load_adapters(fresh, tmp_path / "ad")
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert count_trainable(fresh) == count_trainable(model)


# ---- training -------------------------------------------------------------------------------
def _train(model: nn.Module, steps: int = 12, lr: float = 1e-2) -> tuple[float, float]:
    ids = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = ids.to(next(model.parameters()).device)  # a bnb model quantizes onto the GPU where there is one
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(ids, labels=ids).loss.item()
    return losses[0], final


@pytest.mark.parametrize("kind", ["qblora", "qalora", "qablora"])
def test_loss_falls_on_quantlinear_base(kind):
    model = _adapted(kind)
    first, last = _train(model)
    assert last < first - 0.05, (first, last)
    if kind != "qblora":  # the merged low-bit model computes the same loss
        ids = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(1))
        merged = merge_adapters(copy.deepcopy(model))
        assert not adapter_layers(merged) and count_trainable(merged) == 0
        with torch.no_grad():
            assert abs(merged(ids, labels=ids).loss.item() - last) < 1e-4


def test_qblora_loss_falls_on_bnb_nf4_base():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from ptqlib.stages import quantize as ptq

    model = ptq.quantize("tiny", {"method": "nf4", "double_quant": True, "blocksize": 64})[0]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    apply_adapter(model, "qblora", rank=4, alpha=8)
    first, last = _train(model)
    assert last < first - 0.05, (first, last)
