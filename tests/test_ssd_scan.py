"""ssd_scan (chunked) against the literal recurrence, values and gradients."""

import importlib
import importlib.util
import sys

import pytest
import torch

from ssd4rec.ops import ssd_scan
from ssd4rec.ops.reference import ssd_recurrence_naive

# The package re-exports the function under the module's name, so `import ... as` would
# give the function; fetch the module itself.
ssd_mod = importlib.import_module("ssd4rec.ops.ssd_scan")

CHUNK = 8
TOL = {torch.float32: 1e-4, torch.float64: 1e-5}
INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def rel_err(a, b):
    """||a - b|| / ||b|| (absolute when b is exactly zero)."""
    a, b = a.double(), b.double()
    denom = b.norm()
    return ((a - b).norm() / denom).item() if denom > 0 else (a - b).norm().item()


def make_seq_idx(b, l, chunk_size, gen):
    """Random non-decreasing ids with boundaries on chunk edges and a length-1 sequence."""
    rows = []
    for i in range(b):
        start = torch.zeros(l, dtype=torch.bool)
        start[1:] = torch.rand(l - 1, generator=gen) < 0.25
        if i % 2 == 0:
            start[chunk_size::chunk_size] = True  # boundaries exactly on chunk edges
        if l >= 4:
            t = int(torch.randint(1, l - 1, (1,), generator=gen))
            start[t] = start[t + 1] = True  # a sequence of length 1 at t
        if i % 2 == 1 and l >= 2:
            start[-1] = True  # the last token alone
        rows.append(start.long().cumsum(0) + 5 * i)  # ids need not start at 0
    return torch.stack(rows).to(torch.int32)


def make_inputs(b, l, h, p, g, n, dtype, gen, *, d_shape=None, with_z=False, with_bias=False,
                softplus=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def unif(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dtype)

    t = {
        "x": rnd(b, l, h, p),
        # raw dt goes through softplus, else it is used as is: keep it positive
        "dt": rnd(b, l, h) if softplus else unif(b, l, h) * 0.9 + 0.1,
        "A": -(unif(h) * 1.5 + 0.2),
        "B": rnd(b, l, g, n),
        "C": rnd(b, l, g, n),
    }
    if d_shape == "h":
        t["D"] = rnd(h)
    elif d_shape == "hp":
        t["D"] = rnd(h, p)
    if with_z:
        t["z"] = rnd(b, l, h, p)
    if with_bias:
        t["dt_bias"] = rnd(h) * 0.5 if softplus else unif(h) * 0.2
    for v in t.values():
        v.requires_grad_(True)
    return t


def run_both(inputs, seq_idx, chunk_size, softplus, limit, gen):
    """Outputs and input gradients (from one random upstream gradient) of both versions."""
    kw = dict(seq_idx=seq_idx, dt_softplus=softplus)
    if limit is not None:
        kw["dt_limit"] = limit
    y = ssd_scan(chunk_size=chunk_size, backend="torch", **inputs, **kw)
    y_ref = ssd_recurrence_naive(**inputs, **kw)
    gy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64).to(y_ref.dtype)
    names = list(inputs)
    g = torch.autograd.grad(y, [inputs[k] for k in names], gy)
    g_ref = torch.autograd.grad(y_ref, [inputs[k] for k in names], gy)
    return y, y_ref, dict(zip(names, g)), dict(zip(names, g_ref))


CONFIGS = [
    dict(g=1, d_shape=None, with_z=False, with_bias=False, softplus=False, limit=None, seq=True),
    dict(g=2, d_shape="h", with_z=True, with_bias=True, softplus=True, limit=None, seq=True),
    dict(g=2, d_shape="hp", with_z=False, with_bias=True, softplus=True, limit=(0.05, 1.0), seq=True),
    dict(g=1, d_shape="hp", with_z=True, with_bias=False, softplus=False, limit=(0.2, 0.7), seq=True),
    dict(g=2, d_shape="h", with_z=True, with_bias=True, softplus=True, limit=None, seq=False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("l", [1, 7, 8, 9, 16, 21, 24])
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_matches_recurrence(cfg, l, dtype):
    c = CONFIGS[cfg]
    gen = torch.Generator().manual_seed(1000 * cfg + l)
    b, h, p, n = 2, 4, 3, 5
    inputs = make_inputs(b, l, h, p, c["g"], n, dtype, gen, d_shape=c["d_shape"],
                         with_z=c["with_z"], with_bias=c["with_bias"], softplus=c["softplus"])
    seq_idx = make_seq_idx(b, l, CHUNK, gen) if c["seq"] else None
    y, y_ref, g, g_ref = run_both(inputs, seq_idx, CHUNK, c["softplus"], c["limit"], gen)

    assert y.dtype == dtype and y.shape == (b, l, h, p)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert set(g) == set(INPUT_NAMES) & set(inputs)
    for k in g:
        assert g[k].shape == inputs[k].shape
        assert torch.isfinite(g[k]).all(), k
        assert rel_err(g[k], g_ref[k]) < tol, k


@pytest.mark.parametrize("path", ["matrix", "loop"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_state_passing_paths(monkeypatch, path, dtype):
    """Many chunks (14), through both the (c, c) segsum and the loop over chunks."""
    monkeypatch.setattr(ssd_mod, "_MATRIX_STATE_PASSING_MAX_CHUNKS", 1000 if path == "matrix" else 0)
    gen = torch.Generator().manual_seed(7)
    b, l, h, p, g, n, chunk = 3, 53, 4, 2, 2, 3, 4
    inputs = make_inputs(b, l, h, p, g, n, dtype, gen, d_shape="h", with_z=True,
                         with_bias=True, softplus=True)
    seq_idx = make_seq_idx(b, l, chunk, gen)
    # one row that is a single long sequence, so state must flow across all 14 chunks
    seq_idx[2] = 0
    y, y_ref, gr, gr_ref = run_both(inputs, seq_idx, chunk, True, None, gen)
    assert rel_err(y, y_ref) < TOL[dtype]
    for k in gr:
        assert rel_err(gr[k], gr_ref[k]) < TOL[dtype], k


@pytest.mark.parametrize("block", [2, 3, 16])
@pytest.mark.parametrize("with_seq", [True, False], ids=["seq", "noseq"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_blocked_state_passing(monkeypatch, block, with_seq, dtype):
    """Blocked inter-chunk pass (matrix inside blocks, recursion across blocks), forced with
    tiny thresholds so 28 chunks go through several levels, some with ragged last blocks."""
    monkeypatch.setattr(ssd_mod, "_MATRIX_STATE_PASSING_MAX_CHUNKS", 2)
    monkeypatch.setattr(ssd_mod, "_STATE_PASSING_BLOCK", block)
    gen = torch.Generator().manual_seed(17 + block)
    b, l, h, p, g, n, chunk = 3, 83, 4, 2, 2, 3, 3
    inputs = make_inputs(b, l, h, p, g, n, dtype, gen, d_shape="h", with_z=True,
                         with_bias=True, softplus=True)
    seq_idx = None
    if with_seq:
        seq_idx = make_seq_idx(b, l, chunk, gen)
        seq_idx[2] = 0  # state must flow across every chunk and block
        seq_idx[1, 40:] = 1000  # and one long sequence spanning many blocks after a boundary
    y, y_ref, gr, gr_ref = run_both(inputs, seq_idx, chunk, True, None, gen)
    assert rel_err(y, y_ref) < TOL[dtype]
    for k in gr:
        assert rel_err(gr[k], gr_ref[k]) < TOL[dtype], k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_max_chunk_cap(monkeypatch, dtype):
    """Chunks above _TORCH_MAX_CHUNK are evaluated as smaller chunks: same result."""
    gen = torch.Generator().manual_seed(23)
    b, l, h, p, g, n = 2, 45, 4, 3, 2, 5
    inputs = make_inputs(b, l, h, p, g, n, dtype, gen, d_shape="h", with_z=True,
                         with_bias=True, softplus=True)
    seq_idx = make_seq_idx(b, l, 16, gen)
    monkeypatch.setattr(ssd_mod, "_TORCH_MAX_CHUNK", 5)
    y, y_ref, gr, gr_ref = run_both(inputs, seq_idx, 16, True, None, gen)
    assert rel_err(y, y_ref) < TOL[dtype]
    for k in gr:
        assert rel_err(gr[k], gr_ref[k]) < TOL[dtype], k
    monkeypatch.setattr(ssd_mod, "_TORCH_MAX_CHUNK", None)
    y_uncapped = ssd_scan(chunk_size=16, backend="torch", seq_idx=seq_idx, dt_softplus=True, **inputs)
    assert rel_err(y, y_uncapped) < TOL[dtype]


def test_packing_is_exact():
    """A row of several packed sequences == each sequence scanned alone (values and grads)."""
    gen = torch.Generator().manual_seed(3)
    lens = [5, 1, 8, 3, 11, 1]  # boundaries at 5, 6, 14, 17, 28: off and on chunk edges
    l, h, p, g, n = sum(lens), 4, 3, 2, 5
    inp = make_inputs(1, l, h, p, g, n, torch.float64, gen, d_shape="h", with_z=True,
                      with_bias=True, softplus=True)
    seq_idx = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None].int()
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    packed = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], CHUNK, z=inp["z"],
                      seq_idx=seq_idx, **kw)
    parts, s = [], 0
    for L in lens:
        sl = slice(s, s + L)
        parts.append(ssd_scan(inp["x"][:, sl], inp["dt"][:, sl], inp["A"], inp["B"][:, sl],
                              inp["C"][:, sl], CHUNK, z=inp["z"][:, sl], **kw))
        s += L
    separate = torch.cat(parts, dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)

    gy = torch.randn(packed.shape, generator=gen, dtype=torch.float64)
    leaves = [inp[k] for k in ("x", "dt", "A", "B", "C", "z", "D", "dt_bias")]
    g_packed = torch.autograd.grad(packed, leaves, gy)
    g_sep = torch.autograd.grad(separate, leaves, gy)
    for a, b in zip(g_packed, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    # and the boundaries matter: without seq_idx the state leaks across sequences
    leaky = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], CHUNK, z=inp["z"], **kw)
    assert (leaky - separate).abs().max() > 1e-3


def test_constant_seq_idx_equals_none_and_chunk_size_invariance():
    gen = torch.Generator().manual_seed(11)
    b, l, h, p, g, n = 2, 29, 2, 3, 1, 4
    inp = make_inputs(b, l, h, p, g, n, torch.float64, gen, d_shape="hp")
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    base = ssd_scan(*args, 8, D=inp["D"])
    const = ssd_scan(*args, 8, D=inp["D"], seq_idx=torch.full((b, l), 4, dtype=torch.int32))
    torch.testing.assert_close(const, base, rtol=1e-12, atol=1e-12)
    seq_idx = make_seq_idx(b, l, 8, gen)
    ys = [ssd_scan(*args, cs, D=inp["D"], seq_idx=seq_idx) for cs in (1, 3, 8, 16, 64)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_strong_decay_is_finite(dtype):
    """dt*A of -500 per step: a cumsum-difference form would compute exp(+huge) = inf and
    then inf * 0 = nan; the masked segsum must stay finite and exact."""
    gen = torch.Generator().manual_seed(5)
    b, l, h, p, g, n = 1, 19, 2, 2, 1, 3
    inp = make_inputs(b, l, h, p, g, n, dtype, gen, d_shape="h")
    with torch.no_grad():
        inp["A"].copy_(torch.tensor([-50.0, -0.1], dtype=dtype))
        inp["dt"].mul_(0).add_(10.0)
    seq_idx = make_seq_idx(b, l, CHUNK, gen)
    y, y_ref, gr, gr_ref = run_both(inp, seq_idx, CHUNK, False, None, gen)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < TOL[dtype]
    for k in gr:
        assert torch.isfinite(gr[k]).all(), k
        assert rel_err(gr[k], gr_ref[k]) < TOL[dtype], k


def test_low_precision_inputs_return_input_dtype():
    gen = torch.Generator().manual_seed(2)
    inp = make_inputs(2, 13, 4, 3, 2, 5, torch.float32, gen, d_shape="h", with_z=True)
    seq_idx = make_seq_idx(2, 13, CHUNK, gen)
    y32 = ssd_scan(**{k: v.detach() for k, v in inp.items()}, chunk_size=CHUNK, seq_idx=seq_idx)
    y16 = ssd_scan(**{k: v.detach().bfloat16() for k, v in inp.items()}, chunk_size=CHUNK,
                   seq_idx=seq_idx)
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16.float(), y32) < 0.05  # bf16 rounding of inputs only


def test_bad_arguments():
    x = torch.randn(1, 4, 2, 3)
    args = (x, torch.rand(1, 4, 2), -torch.rand(2), torch.randn(1, 4, 1, 5), torch.randn(1, 4, 1, 5))
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd_scan(*args, 8, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ssd_scan(*args, 8, backend="cuda")
    with pytest.raises(ValueError, match="divisible"):
        ssd_scan(x, args[1], args[2], torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 5), 8)
    with pytest.raises(ValueError, match="seq_idx"):
        ssd_scan(*args, 8, seq_idx=torch.zeros(1, 5, dtype=torch.int32))


# --------------------------------------------------------------------------------------------
# Loading mamba_ssm's Triton kernel (simulated with fake packages: no GPU needed)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_mamba(tmp_path, monkeypatch):
    """Build a fake mamba_ssm whose __init__ imports selective_scan_cuda like 2.3.2 does."""
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        pytest.skip("the real selective_scan_cuda is installed")

    def build(ssd_combined_src, extra_files=None):
        files = {
            "mamba_ssm/__init__.py": "import selective_scan_cuda\n",
            "mamba_ssm/ops/__init__.py": "",
            "mamba_ssm/ops/triton/__init__.py": "",
            "mamba_ssm/ops/triton/ssd_combined.py": ssd_combined_src,
            **(extra_files or {}),
        }
        for rel, src in files.items():
            f = tmp_path / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(src)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()

    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "mamba_ssm"}
    for k in saved:
        del sys.modules[k]
    ssd_mod._load_triton_scan.cache_clear()
    ssd_mod._load_triton_heads_scan.cache_clear()
    yield build
    for k in [k for k in sys.modules if k.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        del sys.modules[k]
    sys.modules.update(saved)
    ssd_mod._load_triton_scan.cache_clear()
    ssd_mod._load_triton_heads_scan.cache_clear()


def test_triton_loader_stubs_missing_mamba1_extension(fake_mamba):
    fake_mamba("def mamba_chunk_scan_combined(*args, **kwargs):\n    return 'fake'\n")
    fn, reason = ssd_mod._load_triton_scan()
    assert reason is None and fn() == "fake"
    # the placeholder lives only for the duration of the import
    assert "selective_scan_cuda" not in sys.modules
    assert ssd_mod._load_triton_scan() == (fn, None)  # cached


def test_triton_loader_keeps_other_import_errors(fake_mamba):
    fake_mamba("import triton_not_installed_xyz\n")
    fn, reason = ssd_mod._load_triton_scan()
    assert fn is None and "triton_not_installed_xyz" in reason
    assert "selective_scan_cuda" not in sys.modules


def test_triton_loader_does_not_mask_a_broken_extension(fake_mamba):
    # An extension that exists but fails to load (e.g. ABI mismatch) is a real error.
    fake_mamba("def mamba_chunk_scan_combined(*a, **k):\n    return 'fake'\n",
               {"selective_scan_cuda.py": "raise ImportError('undefined symbol: _ZN3c10')\n"})
    fn, reason = ssd_mod._load_triton_scan()
    assert fn is None and "undefined symbol" in reason


def test_all_heads_loader_names_what_is_missing(fake_mamba):
    """backend='triton_heads' needs mamba_ssm (as 'triton') and triton itself (its own kernel)."""
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: nothing is missing")
    fake_mamba("def mamba_chunk_scan_combined(*a, **k):\n    return 'fake'\n")
    fn, reason = ssd_mod._load_triton_heads_scan()
    assert fn is None and "triton" in reason
    assert ssd_mod._load_triton_scan()[0] is not None  # the plain Triton backend still loads


def test_all_heads_backend_on_cpu_tensors_says_so():
    args = [torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2), -torch.ones(2),
            torch.randn(1, 5, 1, 3), torch.randn(1, 5, 1, 3)]
    with pytest.raises(RuntimeError, match="backend='triton_heads'.*needs CUDA tensors"):
        ssd_scan(*args, 8, backend="triton_heads")


def test_auto_picks_the_all_heads_kernels_only_where_they_apply(monkeypatch):
    """ssd_scan_xbc's 'auto': the all-heads kernels on CUDA for one group, D per head, not
    float64, sizes their tiles take and chunks run on a GPU, when they import; otherwise what
    ssd_scan's 'auto' picks."""
    def pick(backend, is_cuda, dtype, ngroups, D, headdim=16, d_state=64, chunk_size=64):
        return ssd_mod.uses_all_heads_kernels(backend, is_cuda, dtype, ngroups, D, headdim, d_state, chunk_size)

    d_heads, d_channels = torch.ones(4), torch.ones(4, 16)
    monkeypatch.setattr(ssd_mod, "_load_triton_heads_scan", lambda: (object(), None))
    assert pick("auto", True, torch.bfloat16, 1, d_heads)
    assert pick("auto", True, torch.float32, 1, None)
    assert pick("triton_heads", True, torch.float32, 1, d_heads)
    assert not pick("auto", False, torch.float32, 1, d_heads)       # CPU: the PyTorch scan
    assert not pick("auto", True, torch.float64, 1, d_heads)        # the kernels accumulate in float32
    assert not pick("auto", True, torch.float32, 2, d_heads)        # one group only
    assert not pick("auto", True, torch.float32, 1, d_channels)     # D per head only
    assert not pick("triton", True, torch.float32, 1, d_heads)
    assert not pick("torch", True, torch.float32, 1, d_heads)
    # sizes their tiles cannot take: LifelongRec's headdim 25, a d_state or chunk under 16
    assert not pick("auto", True, torch.float32, 1, d_heads, headdim=25)
    assert not pick("auto", True, torch.float32, 1, d_heads, d_state=8)
    assert not pick("auto", True, torch.float32, 1, d_heads, chunk_size=8)
    assert not pick("auto", True, torch.float32, 1, d_heads, chunk_size=32)  # not run on a GPU yet
    assert pick("auto", True, torch.float32, 1, d_heads, headdim=32, d_state=32, chunk_size=256)
    monkeypatch.setattr(ssd_mod, "_load_triton_heads_scan", lambda: (None, "no triton"))
    assert not pick("auto", True, torch.float32, 1, d_heads)        # falls back to mamba_ssm's or PyTorch
    assert pick("triton_heads", True, torch.float32, 1, d_heads)    # asked for: the loader's error is raised


# --------------------------------------------------------------------------------------------
# GPU: Triton vs this reference (skipped on CPU-only machines)
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_torch_on_gpu():
    fn, reason = ssd_mod._load_triton_scan()
    if fn is None:
        pytest.skip(f"mamba_ssm Triton kernel not available: {reason}")
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, g, n, chunk = 2, 200, 8, 16, 2, 32, 64
    inp = make_inputs(b, l, h, p, g, n, torch.float32, gen, d_shape="h", with_z=True,
                      with_bias=True, softplus=True)
    inp = {k: v.detach().cuda().requires_grad_(True) for k, v in inp.items()}
    seq_idx = make_seq_idx(b, l, chunk, gen).cuda()
    kw = dict(chunk_size=chunk, seq_idx=seq_idx, dt_softplus=True, dt_limit=(0.001, 5.0))
    y_t = ssd_scan(**inp, backend="triton", **kw)
    y_r = ssd_scan(**inp, backend="torch", **kw)
    assert rel_err(y_t, y_r) < 1e-2
    gy = torch.randn_like(y_r)
    g_t = torch.autograd.grad(y_t, list(inp.values()), gy)
    g_r = torch.autograd.grad(y_r, list(inp.values()), gy)
    for k, a, r in zip(inp, g_t, g_r):
        assert rel_err(a, r) < 2e-2, k
