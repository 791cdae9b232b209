"""The all-heads SSD output kernel (``ssd4rec.ops.ssd_scan_heads``) against the float64 loop of
its formula in scripts/bench_scan_heads.py: on the GPU where there is one, else under Triton's
CPU interpreter. Needs triton, which the CPU install does not bring: skipped there. The whole
scan with this kernel (``ssd_scan(backend="triton_heads")``, values and gradients) is checked
against the PyTorch scan in tests/test_gpu.py."""

import importlib
import sys

import pytest
import torch

from tests.script_support import load_script


def test_all_heads_kernel_matches_the_loop(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the kernel needs it")
    if not torch.cuda.is_available():
        # read when the kernel is decorated: (re)import the module under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        sys.modules.pop("ssd4rec.ops.ssd_scan_heads", None)
        importlib.import_module("ssd4rec.ops.ssd_scan_heads")
    module = load_script("bench_scan_heads")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert module.check(device) < module.TOLERANCE[device]
