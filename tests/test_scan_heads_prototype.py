"""scripts/bench_scan_heads.py's all-heads kernel (a prototype for issue #4) against its float64
loop: on the GPU where there is one, else under Triton's CPU interpreter. Needs triton, which
the CPU install does not bring: skipped there."""

import pytest
import torch

from tests.script_support import load_script


def test_all_heads_kernel_matches_the_loop(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the prototype kernel needs it")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the module's kernel is decorated
    module = load_script("bench_scan_heads")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert module.check(device) < module.TOLERANCE[device]
