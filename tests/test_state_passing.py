"""The scan's state passing as a parallel scan over chunks (``ssd4rec.ops.state_passing``),
forward and backward, against a float64 loop of the recurrence whose gradients autograd takes
(scripts/bench_state_passing.py --check): on the GPU where there is one (there also against
mamba_ssm's kernels), else under Triton's CPU interpreter. Needs triton, which the CPU install
does not bring: skipped there. Triton 3.6's interpreter cannot run loops with a bound read at
run time under numpy >= 2.4 (it takes int() of a 1-element array): skipped there too, saying so."""

import pytest
import torch

from tests.script_support import load_script, run_script_interpreted, skip_unless_interpreter_runs_loops


def test_state_passing_matches_the_loop():
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the kernels need it")
    if torch.cuda.is_available():
        module = load_script("bench_state_passing")
        assert module.check("cuda") < module.TOLERANCE
        return
    skip_unless_interpreter_runs_loops()
    run = run_script_interpreted("bench_state_passing", "--check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "state passing vs float64 loop" in run.stdout
