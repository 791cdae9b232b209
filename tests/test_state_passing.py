"""The scan's state passing as a parallel scan over chunks (``ssd4rec.ops.state_passing``),
forward and backward, against a float64 loop of the recurrence whose gradients autograd takes
(scripts/bench_state_passing.py --check): on the GPU where there is one (there also against
mamba_ssm's kernels), else under Triton's CPU interpreter. Needs triton, which the CPU install
does not bring: skipped there. Triton 3.6's interpreter needs numpy < 2.3 for loops with a
runtime bound (numpy 2.3 stopped converting 1-element arrays to int)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.script_support import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_state_passing_matches_the_loop():
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the kernels need it")
    if torch.cuda.is_available():
        module = load_script("bench_state_passing")
        assert module.check("cuda") < module.TOLERANCE
        return
    # The interpreter must be on before triton is first imported: a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_state_passing.py"), "--check"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "state passing vs float64 loop" in run.stdout
