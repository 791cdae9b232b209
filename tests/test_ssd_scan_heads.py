"""The all-heads SSD kernels of ``ssd4rec.ops.ssd_scan_heads`` (the forward's chunk states and
output pass; the backward's pass over token pairs: dx, ddt, dD, dCB, dB, ddA; its pass over the
chunk states: dstates, dC, ddA) and ``ssd4rec.ops.ddA_steps`` (the decays' reverse cumulative
sum) against the float64 loops of their formulas in
scripts/bench_scan_heads.py: on the GPU where there is one, else under Triton's CPU
interpreter. Needs triton, which the CPU install does not bring: skipped there. The whole scan
with these kernels (``ssd_scan(backend="triton_heads")``, values and gradients) is checked
against the PyTorch scan in tests/test_gpu.py."""

import pytest
import torch

from tests.script_support import load_script, run_script_interpreted


@pytest.mark.parametrize("kernel", ["chunk_states", "fwd", "dx", "states", "ddA"],
                         ids=["chunk_states", "output_pass", "dx_pass", "state_pass", "ddA_steps"])
def test_all_heads_kernel_matches_the_loop(kernel):
    pytest.importorskip("triton", reason="triton is not installed (CPU install): the kernels need it")
    if torch.cuda.is_available():
        module = load_script("bench_scan_heads")
        checks = {"chunk_states": module.check_chunk_states, "fwd": module.check, "dx": module.check_dx,
                  "states": module.check_states, "ddA": module.check_ddA}
        assert checks[kernel]("cuda") < module.TOLERANCE["cuda"]
        return
    run = run_script_interpreted("bench_scan_heads", "--check", "--passes", kernel)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{kernel} kernel vs float64 loop" in run.stdout

def test_backward_kernel_autotuning_call_equals_later_calls():
    """The call that autotunes the backward's all-heads kernel runs every config on the real
    output buffers first; what it returns must equal what later calls (one config, tuned) return.
    While all of dD's partial-sum slots were summed, the autotuning call's dD was wrong
    whenever a narrower row block had run before the chosen one, so this test catches that only
    when the autotuner picks a row block wider than the narrowest. GPU only: under the CPU
    interpreter there is a single config, nothing to autotune."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: the CPU interpreter runs one config and never autotunes")
    pytest.importorskip("triton", reason="triton is not installed")
    module = load_script("bench_scan_heads")
    from ssd4rec.ops import ssd_scan_heads

    inputs = module.random_dx_inputs(2, 300, 4, 16, 32, 64, 20, "cuda", torch.bfloat16, torch.Generator().manual_seed(3))
    ssd_scan_heads._pair_grads_all_heads_kernel.cache.clear()  # autotune again, in this call
    first = ssd_scan_heads.pair_grads_all_heads(*inputs)
    again = ssd_scan_heads.pair_grads_all_heads(*inputs)
    for name, a, b in zip(("dx", "ddt", "dD", "dCB", "dB_states", "ddAcs"), first, again):
        assert torch.equal(a, b), f"{name} differs between the autotuning call and the next"
