"""EoRA (ptqlib.adapters.eora): the correction that minimises the output error over the calibration inputs
leaves exactly what the paper's formula says, beats the plain SVD of the weight error on anisotropic
inputs, and at full rank gives the float layer back."""
import torch

from ptqlib.adapters.eora import InputMoments, eora_factors, output_error


def _layer(out=24, inp=32, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Q = torch.round(W * 3) / 3  # a coarse grid: the quantization error
    scales = torch.logspace(-2, 1, inp, dtype=torch.float64)  # outlier channels: far from isotropic inputs
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * scales
    return W, Q, X


def test_the_output_error_left_is_the_tail_of_the_eigenspace_spectrum():
    W, Q, X = _layer()
    H = X.T @ X
    dW = W - Q
    for r, s in ((4, 1.0), (8, 2.0)):
        A, B = eora_factors(dW, H, r, scale=s)
        assert A.shape == (r, 32) and B.shape == (24, r)
        L, QH = torch.linalg.eigh(H)
        S = torch.linalg.svdvals(dW @ (QH * L.sqrt()))
        left = output_error(dW - s * B @ A, H)
        assert abs(left - float((S[r:] ** 2).sum())) < 1e-8 * float((S ** 2).sum())  # Eckart-Young in P's space
        assert abs(output_error(dW - s * B @ A, H) - float(torch.linalg.norm((dW - s * B @ A) @ X.T) ** 2)) < 1e-6


def test_it_beats_the_weight_svd_on_the_outputs_and_the_svd_beats_it_on_the_weights():
    W, Q, X = _layer()
    H, dW, r = X.T @ X, W - Q, 4
    A, B = eora_factors(dW, H, r)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    svd = (U[:, :r] * S[:r]) @ Vh[:r]  # LoftQ's first step: the best rank-r approximation of the weight error
    assert output_error(dW - B @ A, H) < 0.8 * output_error(dW - svd, H)
    assert torch.linalg.norm(dW - svd) < torch.linalg.norm(dW - B @ A)


def test_full_rank_gives_the_float_layer_back_even_with_a_singular_H():
    W, Q, X = _layer(tokens=20)  # 20 tokens, 32 inputs: H has rank 20
    A, B = eora_factors(W - Q, X.T @ X, rank=32, scale=0.5)
    x = torch.randn(5, 32, dtype=torch.float64)
    assert torch.allclose(x @ (Q + 0.5 * B @ A).T, x @ W.T, atol=1e-8)


def test_input_moments_sum_x_transpose_x_over_every_forward():
    lin = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    m = InputMoments(lin, ["0", "1"])
    xs = [torch.randn(2, 5, 6), torch.randn(1, 7, 6)]
    with torch.no_grad():
        for x in xs:
            lin(x)
    H = m.close()
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert torch.allclose(H["0"], X.T @ X)
    with torch.no_grad():
        lin(torch.randn(1, 6))  # hooks removed: nothing more accumulates
    assert torch.allclose(H["0"], X.T @ X) and H["1"].shape == (4, 4)


def test_layers_reading_one_input_share_one_sum():
    """q, k and v (here two heads on one input) are summed once and share H; another input has its own."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    block = Block()
    m = InputMoments(block, ["q", "k", "o"])
    xs = [torch.randn(2, 3, 6), torch.randn(5, 6)]
    with torch.no_grad():
        for x in xs:
            block(x)
    H = m.close()
    X = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert H["q"] is H["k"] and torch.allclose(H["q"], X.T @ X) and H["o"] is not H["q"]


def test_cloqs_start_is_the_calibrated_minimiser_by_cholesky_split_evenly():
    """CLoQ's closed form written independently (H = R^T R by Cholesky: the rank-r minimiser of ||(dW - L) X^T||
    is [dW R^T]_r R^{-T}) equals the even split's product; each factor then carries S_r^{1/2}, one scale."""
    W, Q, X = _layer()
    H, dW, r, s = X.T @ X, W - Q, 6, 2.0
    A, B = eora_factors(dW, H, r, scale=s, split="even")
    R = torch.linalg.cholesky(H).T  # upper: H = R^T R
    U, S, Vh = torch.linalg.svd(dW @ R.T, full_matrices=False)
    closed = torch.linalg.solve_triangular(R, ((U[:, :r] * S[:r]) @ Vh[:r]).T, upper=True).T  # [dW R^T]_r R^{-T}
    assert torch.allclose(s * B @ A, closed, atol=1e-9 * float(dW.abs().max()))
    A_e, B_e = eora_factors(dW, H, r, scale=s)
    assert torch.allclose(B @ A, B_e @ A_e, atol=1e-10)  # EoRA's product: only the split differs
    col, row = torch.linalg.norm(s * B, dim=0), torch.linalg.norm(A @ R.T, dim=1)  # in P's space: sqrt(S) each
    assert torch.allclose(col, row, rtol=1e-8) and torch.allclose(col ** 2, S[:r], rtol=1e-8)
    import pytest

    with pytest.raises(ValueError, match="split: 'odd' is not a split; valid: eora, even"):
        eora_factors(dW, H, r, split="odd")
