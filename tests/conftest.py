import os

import pytest
import torch

import ssd4rec  # noqa: F401  (ssd4rec.compat first: RecBole's import-time anomaly mode stays off)


# torch reads CUDA_VISIBLE_DEVICES until CUDA starts in the process: start it now, where a GPU
# is visible, so that the GPUs this process was given stay its GPUs whatever a test's RecBole
# Config writes into the variable (see restore_cuda_visible_devices).
if torch.cuda.is_available():
    torch.cuda.init()


@pytest.fixture(autouse=True)
def restore_cuda_visible_devices():
    """RecBole's Config writes gpu_id into CUDA_VISIBLE_DEVICES of the test process ('' for a
    CPU run, '0' by default), and the subprocesses later tests start inherit it: put back what
    the process was started with."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield
    if before is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = before


@pytest.fixture
def one_torch_thread():
    """For tests on tiny tensors: a second intra-op thread gains nothing, and on a busy
    2-core machine it made each small op wait for a descheduled thread (100x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pinned_triton_configs():
    """Pin every autotuned mamba_ssm Triton kernel to one config for the GPU tests.

    Autotuning benchmarks each of up to 11 configs per kernel and per key (dtype, head dim,
    state size, chunk size): on a fresh H100 the GPU test files ran for minutes per test, most
    of it autotuning. Correctness does not depend on the config (every config computes the
    same function), so the tests take the cheapest one (mamba_ssm's own rule for deterministic
    mode: smallest block product x stages) and keep the kernels' default, non-deterministic
    code. Benchmarks and training autotune as usual. SSD4REC_TEST_AUTOTUNE=1 turns this off.
    """
    import importlib

    if os.environ.get("SSD4REC_TEST_AUTOTUNE") == "1" or not torch.cuda.is_available():
        yield []
        return
    # Load the kernels the way ssd4rec does (it handles mamba_ssm's Mamba-1 import trap).
    if importlib.import_module("ssd4rec.ops.ssd_scan")._load_triton_scan()[0] is None:
        yield []
        return
    from triton.runtime.autotuner import Autotuner

    def cost(cfg):
        product = 1
        for key, value in cfg.kwargs.items():
            if key.startswith("BLOCK_SIZE_"):
                product *= value
        return product * (cfg.num_stages or 1)

    pinned = []
    for name in ("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_state_passing", "ssd_combined",
                 "layernorm_gated", "k_activations"):
        module = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                saved = obj.configs
                obj.configs = [min(saved, key=cost)]
                pinned.append((obj, saved, f"{name}.{attr}"))
    yield [label for _, _, label in pinned]
    for obj, saved, _ in pinned:
        obj.configs = saved


@pytest.fixture
def fresh_dynamo():
    """compile_glue's regions compiled afresh with inductor (the default backend) for this
    test: the GPU tests check inductor's generated code, the CPU tests use aot_eager."""
    import torch

    from ssd4rec.modules import compiled_glue

    torch._dynamo.reset()
    compiled_glue._compile.cache_clear()
    yield compiled_glue
    torch._dynamo.reset()
    compiled_glue._compile.cache_clear()
