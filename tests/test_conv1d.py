"""causal_conv1d (vectorised) against the loop reference and torch's conv1d."""

import pytest
import torch
import torch.nn.functional as F

import ssd4rec.ops.conv1d as conv_mod
from ssd4rec.ops import causal_conv1d
from ssd4rec.ops.reference import causal_conv1d_naive

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(a, b):
    a, b = a.double(), b.double()
    denom = b.norm()
    return ((a - b).norm() / denom).item() if denom > 0 else (a - b).norm().item()


def make_seq_idx(b, l, gen):
    rows = []
    for i in range(b):
        start = torch.zeros(l, dtype=torch.bool)
        start[1:] = torch.rand(l - 1, generator=gen) < 0.3
        if l >= 4:
            t = int(torch.randint(1, l - 1, (1,), generator=gen))
            start[t] = start[t + 1] = True  # a length-1 sequence
        rows.append(start.long().cumsum(0) + 7 * i)
    return torch.stack(rows).to(torch.int32)


def make(b, dim, l, w, dtype, gen, with_bias):
    x = torch.randn(b, dim, l, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(dim, w, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    bias = (torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            if with_bias else None)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_seq", [False, True], ids=["noseq", "seq"])
@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize("l", [1, 3, 17])
def test_matches_naive(l, w, with_seq, activation, dtype):
    gen = torch.Generator().manual_seed(100 * l + 10 * w + with_seq)
    b, dim = 2, 5
    x, weight, bias = make(b, dim, l, w, dtype, gen, with_bias=(l != 3))
    seq_idx = make_seq_idx(b, l, gen) if with_seq else None
    y = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation, backend="torch")
    y_ref = causal_conv1d_naive(x, weight, bias, seq_idx=seq_idx, activation=activation)
    assert y.dtype == dtype and y.shape == (b, dim, l)
    assert rel_err(y, y_ref) < TOL[dtype]

    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [t for t in (x, weight, bias) if t is not None]
    for a, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        assert rel_err(a, r) < TOL[dtype]


@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("w", [2, 4])
def test_equals_torch_conv1d_without_seq_idx(w, activation):
    gen = torch.Generator().manual_seed(w)
    b, dim, l = 3, 6, 23
    x, weight, bias = make(b, dim, l, w, torch.float64, gen, with_bias=True)
    y = causal_conv1d(x, weight, bias, activation=activation)
    ref = F.conv1d(x, weight[:, None, :], bias, padding=w - 1, groups=dim)[..., :l]
    if activation is not None:
        ref = F.silu(ref)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_packing_is_exact():
    gen = torch.Generator().manual_seed(0)
    lens = [4, 1, 2, 9, 1]
    dim, w, l = 3, 4, sum(lens)
    x, weight, bias = make(1, dim, l, w, torch.float64, gen, with_bias=True)
    seq_idx = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None].int()
    packed = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu")
    parts = torch.split(x, lens, dim=-1)
    separate = torch.cat([causal_conv1d(p, weight, bias, activation="silu") for p in parts], -1)
    torch.testing.assert_close(packed, separate, rtol=1e-12, atol=1e-12)
    # the mask matters: without it the windows run across boundaries
    assert (causal_conv1d(x, weight, bias, activation="silu") - separate).abs().max() > 1e-3


def test_low_precision_returns_input_dtype():
    x = torch.randn(2, 4, 10).bfloat16()
    y = causal_conv1d(x, torch.randn(4, 4).bfloat16(), seq_idx=torch.zeros(2, 10, dtype=torch.int32))
    assert y.dtype == torch.bfloat16


def test_bad_arguments():
    x, wt = torch.randn(1, 2, 5), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        causal_conv1d(x, wt, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, wt, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, wt, activation="relu")
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(x, wt, seq_idx=torch.zeros(1, 4, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_torch_on_gpu():
    fn, reason = conv_mod._load_cuda_conv1d()
    if fn is None:
        pytest.skip(f"causal_conv1d not available: {reason}")
    gen = torch.Generator().manual_seed(0)
    b, dim, l, w = 2, 64, 300, 4
    x, weight, bias = (t.detach().cuda().requires_grad_() for t in
                       make(b, dim, l, w, torch.float32, gen, with_bias=True))
    seq_idx = make_seq_idx(b, l, gen).cuda()
    y_c = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="cuda")
    y_t = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="torch")
    assert rel_err(y_c, y_t) < 1e-4
    gy = torch.randn_like(y_t)
    for a, r in zip(torch.autograd.grad(y_c, [x, weight, bias], gy),
                    torch.autograd.grad(y_t, [x, weight, bias], gy)):
        assert rel_err(a, r) < 1e-4


def test_nothing_of_another_sequence_reaches_a_position_not_even_nan():
    """The window positions that cross a boundary are computed anew, not corrected: a NaN or
    inf in one sequence leaves the next sequences' outputs finite, and the last sequence's
    outputs and gradients equal to those of the sequence alone."""
    gen = torch.Generator().manual_seed(3)
    lens = [5, 3, 6]
    dim, w, l = 4, 4, sum(lens)
    x, weight, bias = make(1, dim, l, w, torch.float32, gen, with_bias=True)
    with torch.no_grad():
        x[0, 1, 4] = float("nan")  # last token of sequence 0
        x[0, 2, 7] = float("inf")  # last token of sequence 1
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None].int()
    y = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="torch")
    last = slice(8, 14)
    alone = x[..., last].detach().clone().requires_grad_()
    y_alone = causal_conv1d(alone, weight, bias, activation="silu", backend="torch")
    # sequence 1 right after sequence 0's NaN, and all of sequence 2 right after the inf
    assert torch.isfinite(y[..., 5:7]).all() and torch.isfinite(y[..., 8:]).all()
    # equal up to rounding: boundary positions sum their taps in another order than the conv
    torch.testing.assert_close(y[..., last], y_alone, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(y[..., last].sum(), x)
    (gx_alone,) = torch.autograd.grad(y_alone.sum(), alone)
    assert torch.isfinite(gx[..., last]).all()
    # Nothing reaches the earlier sequences but the 0 * NaN of their own NaN and inf (silu's
    # backward multiplies a zero gradient by its derivative there, alone just the same).
    assert (gx[..., :8].nan_to_num(0.0, 0.0, 0.0) == 0).all()
    torch.testing.assert_close(gx[..., last], gx_alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [2, 3, 4])
def test_unsorted_sequence_ids_match_naive(w):
    gen = torch.Generator().manual_seed(w)
    x, weight, bias = make(2, 3, 12, w, torch.float64, gen, with_bias=True)
    seq_idx = torch.tensor([[0, 0, 5, 5, 1, 0, 0, 0, 2, 2, 1, 1],
                            [3, 3, 3, 0, 3, 3, 1, 1, 1, 1, 0, 0]], dtype=torch.int32)
    y = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="torch")
    y_ref = causal_conv1d_naive(x, weight, bias, seq_idx=seq_idx, activation="silu")
    assert rel_err(y, y_ref) < TOL[torch.float64]
    leaves = (x, weight, bias)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        assert rel_err(a, r) < TOL[torch.float64]



def test_autocast_leaves_the_conv_in_float32():
    """Under bf16 autocast (amp: bf16) the conv still computes in float32, as the scan does."""
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = make(1, 8, 20, 4, torch.float32, gen, with_bias=True)
    seq_idx = make_seq_idx(1, 20, gen)
    plain = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation="silu", backend="torch")
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
