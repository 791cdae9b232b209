"""selective_scan (Mamba-1, blocked recurrence, custom backward) against the literal loop.

The reference below implements the definition one step at a time with autograd, in the input
dtype, and shares no code with the op: B / C groups are repeated per channel, the state is a
plain (b, d, n) tensor updated by exp(delta A) h + delta u B.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

ss = importlib.import_module("ssd4rec.ops.selective_scan")
selective_scan = ss.selective_scan

TOL = {torch.float32: 1e-4, torch.float64: 1e-5}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """y (b, d, l) and the last state (b, d, n), one time step per iteration."""
    b, d, l = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_step(M):  # -> l tensors of shape (b, d, n)
        if M.dim() == 2:
            return [M.expand(b, d, n)] * l
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(d // M.shape[1], dim=1).unbind(-1)

    Bs, Cs = per_step(B), per_step(C)
    us, ds = u.unbind(-1), delta.unbind(-1)
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        h = torch.exp(ds[t][..., None] * A) * h + (ds[t] * us[t])[..., None] * Bs[t]
        ys.append((h * Cs[t]).sum(-1))
    y = torch.stack(ys, -1) if l else u.clone()
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def rel_err(a, b):
    a, b = a.double(), b.double()
    denom = b.norm()
    return ((a - b).norm() / denom).item() if denom > 0 else (a - b).norm().item()


def make_inputs(b, d, l, n, bc, dtype, gen, *, with_D=True, with_z=True, with_bias=True,
                softplus=True, positive_A=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def bc_tensor():
        if bc == "const":
            return rnd(d, n)
        if bc == "var":
            return rnd(b, n, l)
        return rnd(b, 2, n, l)  # two groups

    A = -torch.exp(rnd(d, n) * 0.5)  # negative, spread over ~[0.3, 3] like an S4D init
    if positive_A:
        A = A.abs() * 0.3  # growing state: the recurrence must stay exact for any sign
    t = {
        "u": rnd(b, d, l),
        # raw delta goes through softplus, else it is used as is: keep it positive
        "delta": rnd(b, d, l) if softplus else torch.rand(b, d, l, generator=gen,
                                                          dtype=torch.float64).to(dtype) * 0.9 + 0.05,
        "A": A,
        "B": bc_tensor(),
        "C": bc_tensor(),
    }
    if with_D:
        t["D"] = rnd(d)
    if with_z:
        t["z"] = rnd(b, d, l)
    if with_bias:
        t["delta_bias"] = rnd(d) * 0.5
    for v in t.values():
        v.requires_grad_(True)
    return t


def check_against_naive(inputs, softplus, dtype, gen):
    y, last = selective_scan(**inputs, delta_softplus=softplus, return_last_state=True,
                             backend="torch")
    y_ref, last_ref = naive_selective_scan(**inputs, delta_softplus=softplus)
    assert y.dtype == dtype and y.shape == inputs["u"].shape
    assert last.shape == last_ref.shape
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(last, last_ref) < tol
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    names = [k for k in NAMES if k in inputs]
    g = torch.autograd.grad(y, [inputs[k] for k in names], gy)
    g_ref = torch.autograd.grad(y_ref, [inputs[k] for k in names], gy)
    for k, a, r in zip(names, g, g_ref):
        assert a.shape == inputs[k].shape, k
        assert torch.isfinite(a).all(), k
        assert rel_err(a, r) < tol, (k, rel_err(a, r))


CONFIGS = [
    dict(bc="var", with_D=True, with_z=True, with_bias=True, softplus=True),  # Mamba's use
    dict(bc="grouped", with_D=True, with_z=False, with_bias=True, softplus=True),
    dict(bc="const", with_D=False, with_z=True, with_bias=False, softplus=False),
    dict(bc="var", with_D=False, with_z=False, with_bias=False, softplus=False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("l", [1, 5, 13])
@pytest.mark.parametrize("block", ["one", "4", "4-recompute", "1-recompute"])  # steps per block
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_matches_naive_loop(monkeypatch, cfg, block, l, dtype):
    c = CONFIGS[cfg]
    b, d, n = 3, 6, 4
    if block != "one":  # force several blocks (and a ragged last one for l = 5, 13)
        monkeypatch.setattr(ss, "_BLOCK_ELEMENTS", int(block.split("-")[0]) * b * d * n)
    if block.endswith("recompute"):  # backward recomputes each block from its start state
        monkeypatch.setattr(ss, "_KEEP_STATES_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(100 * cfg + l)
    inputs = make_inputs(b, d, l, n, c["bc"], dtype, gen, with_D=c["with_D"], with_z=c["with_z"],
                         with_bias=c["with_bias"], softplus=c["softplus"])
    check_against_naive(inputs, c["softplus"], dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mamba_sizes_and_growing_state(monkeypatch, dtype):
    """Mamba4Rec's channel / state sizes (d 128, n 32) with S4D's A = -[1..n], over 5 blocks
    recomputed in backward; then a positive A (growing state), where log-space tricks fail."""
    monkeypatch.setattr(ss, "_BLOCK_ELEMENTS", 8 * 2 * 128 * 32)
    monkeypatch.setattr(ss, "_KEEP_STATES_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(2, 128, 37, 32, "var", dtype, gen)
    with torch.no_grad():
        inputs["A"].copy_(-torch.arange(1, 33, dtype=dtype).repeat(128, 1))
    check_against_naive(inputs, True, dtype, gen)

    inputs = make_inputs(2, 8, 20, 4, "grouped", dtype, gen, positive_A=True)
    check_against_naive(inputs, True, dtype, gen)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_gradcheck_custom_backward(monkeypatch, keep):
    """The hand-written backward against finite differences (float64, 3 blocks)."""
    monkeypatch.setattr(ss, "_BLOCK_ELEMENTS", 2 * 2 * 3 * 2)
    if not keep:
        monkeypatch.setattr(ss, "_KEEP_STATES_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(5)
    for bc in ("var", "grouped", "const"):
        t = make_inputs(2, 4 if bc == "grouped" else 3, 5, 2, bc, torch.float64, gen)
        names = list(t)

        def f(*args):
            return selective_scan(**dict(zip(names, args)), delta_softplus=True, backend="torch")

        assert torch.autograd.gradcheck(f, tuple(t[k] for k in names), eps=1e-6, atol=1e-6)


def test_half_precision_inputs_computed_in_float32():
    gen = torch.Generator().manual_seed(11)
    t = make_inputs(2, 4, 6, 3, "var", torch.float64, gen)
    half = {k: v.detach().to(torch.bfloat16) for k, v in t.items()}
    y = selective_scan(**half, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    ref, _ = naive_selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    assert rel_err(y, ref) < 1e-2  # only the bf16 rounding of the output


def test_backward_twice_with_retain_graph():
    """Saved block tensors are never overwritten, so a retained graph gives the same grads."""
    gen = torch.Generator().manual_seed(4)
    t = make_inputs(2, 4, 6, 3, "var", torch.float64, gen)
    y = selective_scan(**t, delta_softplus=True)
    g1 = torch.autograd.grad(y.sum(), list(t.values()), retain_graph=True)
    g2 = torch.autograd.grad(y.sum(), list(t.values()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_autocast_keeps_the_scan_in_float32():
    """bf16 autocast training: the inputs arrive as bf16 or float32, the scan itself (its
    matmuls included) runs in float32, forward and backward."""
    gen = torch.Generator().manual_seed(12)
    t = make_inputs(2, 8, 9, 4, "var", torch.float32, gen)
    y_ref, _ = naive_selective_scan(**t, delta_softplus=True)
    g_ref = torch.autograd.grad(y_ref.sum(), list(t.values()))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = selective_scan(**t, delta_softplus=True)
    g = torch.autograd.grad(y.sum(), list(t.values()))
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-5
    for k, a, r in zip(t, g, g_ref):
        assert rel_err(a, r) < 1e-5, k


def test_no_grad_and_zero_length():
    gen = torch.Generator().manual_seed(2)
    t = make_inputs(2, 4, 6, 3, "var", torch.float32, gen)
    with torch.no_grad():
        y = selective_scan(**t, delta_softplus=True)
    assert not y.requires_grad
    empty = {k: (v[..., :0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in t.items()}
    y0, last0 = selective_scan(**empty, delta_softplus=True, return_last_state=True)
    assert y0.shape == (2, 4, 0) and last0.shape == (2, 4, 3) and not last0.any()


def test_bad_arguments():
    u = torch.randn(2, 4, 5)
    A = -torch.ones(4, 3)
    B = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(u, u, A, B, B, backend="bogus")
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, u, A, torch.randn(2, 3, 4), B)
    with pytest.raises(ValueError, match="groups|g dividing"):
        selective_scan(u, u, A, torch.randn(2, 3, 3, 5), B)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, u, -torch.ones(5, 3), B, B)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(u, u, A, B, B, D=torch.ones(5))
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan(u, u, A.to(torch.complex64), B, B)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        selective_scan(u, u, A, B, B, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors.*backend='torch'"):
        selective_scan(u, u, A, B, B, backend="triton")


def test_implementation_record(monkeypatch):
    assert ss.selective_scan_implementation("cpu").startswith("torch")
    assert ss.selective_scan_implementation(torch.device("cuda:0"), backend="torch").startswith("torch")
    monkeypatch.setattr(ss, "_load_cuda_scan", lambda: (None, "ModuleNotFoundError: no selective_scan_cuda"))
    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (None, "ModuleNotFoundError: no triton"))
    line = ss.selective_scan_implementation("cuda")
    assert line.startswith("torch") and "not available" in line and "selective_scan_cuda" in line
    assert "Triton not available (ModuleNotFoundError: no triton)" in line
    assert ss.selective_scan_implementation("cuda", backend="cuda").startswith("unavailable")
    assert ss.selective_scan_implementation("cuda", backend="triton").startswith("unavailable")
    # without the CUDA kernel, auto runs the Triton core where triton imports
    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (object(), None))
    line = ss.selective_scan_implementation("cuda")
    assert line.startswith("triton (ssd4rec.ops.selective_scan_triton)") and "selective_scan_cuda" in line
    assert ss.selective_scan_implementation("cuda", backend="triton") == "triton (ssd4rec.ops.selective_scan_triton)"
    assert ss.selective_scan_implementation("cpu", backend="triton").startswith("unavailable")
    monkeypatch.setattr(ss, "_load_cuda_scan", lambda: (object(), None))
    assert ss.selective_scan_implementation("cuda").startswith("cuda")
    assert ss.selective_scan_implementation("cpu").startswith("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_matches_naive():
    """On a GPU, whatever 'auto' picks (the CUDA kernel if it imports, else this module)
    against the float64 loop on CPU."""
    gen = torch.Generator().manual_seed(9)
    t = make_inputs(3, 64, 50, 16, "var", torch.float64, gen)
    y_ref, _ = naive_selective_scan(**t, delta_softplus=True)
    gy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad(y_ref, list(t.values()), gy)
    tc = {k: v.detach().float().cuda().requires_grad_(True) for k, v in t.items()}
    y = selective_scan(**tc, delta_softplus=True, backend="auto")
    g = torch.autograd.grad(y, list(tc.values()), gy.float().cuda())
    print(ss.selective_scan_implementation("cuda"))
    assert rel_err(y.cpu(), y_ref) < 1e-4
    for k, a, r in zip(t, g, g_ref):
        assert rel_err(a.cpu(), r) < 1e-3, k
