"""Loading a file of scripts/ as a module, or running it under Triton's CPU interpreter, for the
tests of the benchmark scripts."""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name):
    """scripts/<name>.py, executed as a fresh module named <name>."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script_interpreted(name, *args, timeout=600):
    """``python scripts/<name>.py ARGS`` with TRITON_INTERPRET=1, in a fresh process: the
    interpreter must be on before triton is first imported (triton.language's own jit functions,
    tl.sum among them, are built then). Returns the CompletedProcess (text output captured)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


# A loop whose bound is read at run time, the shape of our kernels' loops over tokens and chunks.
_PROBE = r"""
import torch, triton, triton.language as tl

@triton.jit
def count(bound_ptr, out_ptr):
    total = 0
    for _ in range(0, tl.load(bound_ptr)):
        total += 1
    tl.store(out_ptr, total)

out = torch.zeros(1, dtype=torch.int32)
count[(1,)](torch.tensor([3], dtype=torch.int32), out)
assert out.item() == 3, out
"""


@functools.cache
def _interpreter_failure():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    return None if run.returncode == 0 else (run.stdout + run.stderr).strip().splitlines()[-1]


def skip_unless_interpreter_runs_loops():
    """Skip, naming why, where Triton's CPU interpreter cannot run a loop with a bound read at
    run time: Triton 3.6's takes int() of a 1-element numpy array there, which numpy 2.4 made
    a TypeError (triton-lang/triton#9171, fixed after 3.6). Our kernels are not at fault
    there, and on a GPU the same tests run them compiled instead."""
    failure = _interpreter_failure()
    if failure is not None:
        import numpy
        import triton
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop with a bound read at run "
                    f"time under numpy {numpy.__version__} (triton-lang/triton#9171): {failure}")
