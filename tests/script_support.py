"""Loading a file of scripts/ as a module, or running it under Triton's CPU interpreter, for the
tests of the benchmark scripts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
