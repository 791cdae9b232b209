"""The Triton core of the Mamba-1 selective scan (``ssd4rec.ops.selective_scan_triton``) and its
dispatch from ``selective_scan``.

- Under Triton's CPU interpreter (a fresh process; skipped where triton is missing, as in the
  CPU install): the core against a float64 loop of the recurrence, values and all five
  gradients, on shapes that hit the masks and the chunking (``scripts/bench_selective_scan.py
  --check``), and ``selective_scan(backend="triton")`` against ``backend="torch"``.
- On a GPU: against the PyTorch core at Mamba4Rec's shapes, the whole op, and that "auto" picks
  the Triton core when mamba_ssm's ``selective_scan_cuda`` is missing.
- Anywhere: the dispatch's errors and records, with the loaders replaced.
"""

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.script_support import load_script, run_script_interpreted

ROOT = Path(__file__).resolve().parents[1]
ss = importlib.import_module("ssd4rec.ops.selective_scan")
sst = importlib.import_module("ssd4rec.ops.selective_scan_triton")


def test_triton_core_matches_the_float64_loop():
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the kernels need it")
    if torch.cuda.is_available():
        module = load_script("bench_selective_scan")
        assert module.check("cuda") < module.TOLERANCE["cuda"]
        return
    run = run_script_interpreted("bench_selective_scan", "--check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Triton selective scan vs float64 loop (cpu)" in run.stdout
    assert "selective_scan(backend='triton') vs backend='torch'" in run.stdout


def test_importing_the_ops_needs_no_triton():
    # triton made unimportable, as on a machine without it (where triton is installed, other
    # parts of the package load it when they are imported, so its presence proves nothing)
    code = ("import sys; sys.modules['triton'] = None; "
            "import ssd4rec.ops.selective_scan, ssd4rec.ops.selective_scan_triton")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def _cpu_inputs(b=2, d=4, l=5, n=3, B_shape=None, dtype=torch.float32):
    u = torch.randn(b, d, l, dtype=dtype)
    B = torch.randn(*(B_shape or (b, n, l)), dtype=dtype)
    return u, u.clone(), -torch.ones(d, n, dtype=dtype), B, B.clone()


def test_forced_triton_errors(monkeypatch):
    """backend="triton": CUDA tensors (or the interpreter), triton, float32, B, C (b, n, l);
    each refusal names the alternative."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*backend='torch'"):
        ss.selective_scan(*_cpu_inputs(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors allowed: the next errors show
    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (None, "ModuleNotFoundError: no triton"))
    with pytest.raises(RuntimeError, match="triton is not available.*no triton.*backend='torch'"):
        ss.selective_scan(*_cpu_inputs(), backend="triton")

    def never(*args):
        raise AssertionError("the core must not run")

    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (never, None))
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        ss.selective_scan(*_cpu_inputs(dtype=torch.float64), backend="triton")
    u, dl, A, _, _ = _cpu_inputs()
    with pytest.raises(ValueError, match=r"\(b, n, l\).*backend='torch'"):
        ss.selective_scan(u, dl, A, torch.randn(4, 3), torch.randn(4, 3), backend="triton")
    with pytest.raises(ValueError, match=r"\(b, n, l\)"):
        ss.selective_scan(u, dl, A, torch.randn(2, 2, 3, 5), torch.randn(2, 2, 3, 5), backend="triton")


def test_mamba4rec_backends_and_record(monkeypatch):
    """The config key backend: "triton" runs our Triton scan core; the reproduction record
    follows the key."""
    from ssd4rec.models.mamba4rec import _SCAN_BACKEND
    from ssd4rec.reproduce import plan

    assert _SCAN_BACKEND["triton"] == "triton" and _SCAN_BACKEND["auto"] == "auto"
    assert set(_SCAN_BACKEND.values()) <= set(ss._BACKENDS)
    monkeypatch.setattr(ss, "_load_cuda_scan", lambda: (None, "ModuleNotFoundError: no selective_scan_cuda"))
    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (object(), None))
    gpu = "NVIDIA H100 80GB HBM3"
    assert plan.implementation_notes("Mamba4Rec", gpu)["selective_scan"].startswith(
        "triton (ssd4rec.ops.selective_scan_triton); mamba_ssm CUDA kernel not available")
    assert plan.implementation_notes("Mamba4Rec", gpu, "torch")["selective_scan"].startswith("torch (")
    assert plan.implementation_notes("Mamba4Rec", gpu, "triton")["selective_scan"] == \
        "triton (ssd4rec.ops.selective_scan_triton)"
    assert plan.implementation_notes("Mamba4Rec", "cpu (2 threads)")["selective_scan"].startswith("torch (")


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(64, 128, 200, 32), (5, 40, 37, 5)], ids=["mamba4rec", "ragged"])
def test_gpu_triton_core_matches_torch_core(shape):
    """fp32, same GPU: y, last state and the five gradients; shape (b, d, l, n)."""
    pytest.importorskip("triton", reason="triton is not installed")
    bench = load_script("bench_selective_scan")
    b, d, l, n = shape
    gen = torch.Generator().manual_seed(3)
    inputs = bench.random_inputs(b, d, l, n, gen, torch.float32, "cuda")
    gy = torch.randn(b, d, l, generator=gen).cuda()
    ref = bench.outputs_and_grads(ss._SelectiveScanCore.apply, inputs, gy)
    ours = bench.outputs_and_grads(sst.selective_scan_triton_core, inputs, gy)
    for name, a, r in zip(bench.QUANTITIES, ours, ref):
        assert _rel(a, r) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_selective_scan_triton_backend_and_auto(monkeypatch):
    """The whole op (delta bias, softplus, D, z) with backend="triton" against "torch"; then
    "auto" without selective_scan_cuda runs the Triton core, without a warning."""
    pytest.importorskip("triton", reason="triton is not installed")
    b, d, l, n = 8, 48, 50, 16
    gen = torch.Generator().manual_seed(4)
    t = dict(u=torch.randn(b, d, l, generator=gen), delta=torch.randn(b, d, l, generator=gen),
             A=-torch.exp(torch.randn(d, n, generator=gen) * 0.5), B=torch.randn(b, n, l, generator=gen),
             C=torch.randn(b, n, l, generator=gen), D=torch.randn(d, generator=gen),
             z=torch.randn(b, d, l, generator=gen), delta_bias=torch.randn(d, generator=gen) * 0.5)
    gy = torch.randn(b, d, l, generator=gen).cuda()

    def run(backend):
        leaves = {k: v.cuda().requires_grad_(True) for k, v in t.items()}
        y, last = ss.selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        return [y, last, *torch.autograd.grad(y, list(leaves.values()), gy)]

    ref = run("torch")
    for name, a, r in zip(["y", "last", *t], run("triton"), ref):
        assert _rel(a, r) < 1e-4, name

    calls = []
    core, reason = sst._load_triton_selective_scan()
    assert core is not None, reason

    def counted(*args):
        calls.append(1)
        return core(*args)

    monkeypatch.setattr(ss, "_load_cuda_scan", lambda: (None, "ModuleNotFoundError: no selective_scan_cuda"))
    monkeypatch.setattr(ss, "_load_triton_selective_scan", lambda: (counted, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = run("auto")
    assert calls, "auto did not run the Triton core"
    for name, a, r in zip(["y", "last", *t], out, ref):
        assert _rel(a, r) < 1e-4, name
    assert ss.selective_scan_implementation("cuda").startswith("triton (ssd4rec.ops.selective_scan_triton)")
