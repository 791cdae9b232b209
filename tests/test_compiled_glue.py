"""compile_glue: the ssd backbone's glue through torch.compile equals the eager model.

CPU tests, small sizes. Most compile with the "aot_eager" backend (the same traced graphs,
no code generation: about a second); one test compiles with inductor, the backend the option
is for (C++ code generation on CPU: about 15 s on a 2-core machine). The CUDA check with
inductor is in tests/test_lifelong_gpu.py.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import ssd4rec.models.lifelong as lifelong
import ssd4rec.modules.mamba2 as mamba2
import ssd4rec.modules.stateful as stateful
from ssd4rec.errors import SSD4RecError
from ssd4rec.models.lifelong import LifelongRec
from ssd4rec.modules import compiled_glue
from ssd4rec.modules.mamba2 import GatedRMSNorm
from tests.lifelong_support import (FakeDataset, assert_same_run, make_batch, make_config, make_model,
                                    train_and_score)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [45, 30, 25]  # T = 100 packed tokens


@pytest.fixture
def graphs(monkeypatch):
    """Compile with aot_eager through a backend that records every graph it is given; fresh
    dynamo caches (a test's compilations neither serve the next nor use up its recompile limit)."""
    recorded = []
    aot_eager = lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        recorded.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(compiled_glue, "COMPILE_BACKEND", recording_backend)
    torch._dynamo.reset()
    yield recorded
    torch._dynamo.reset()
    compiled_glue._compile.cache_clear()


@pytest.fixture
def external_ops_eager(monkeypatch):
    """Record, for every call of the scan and the convolution, whether dynamo was tracing it
    (it would be if either ended up inside a compiled region)."""
    tracing = []

    def watch(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            tracing.append(torch.compiler.is_compiling())
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, scan in ((mamba2, "ssd_scan_xbc"), (stateful, "ssd_scan")):
        watch(module, scan)
        watch(module, "causal_conv1d")
    return tracing


@pytest.mark.parametrize("window", [64, 20])
def test_compiled_glue_equals_eager(window, graphs, external_ops_eager):
    """Loss, every parameter's gradient, eval scores. window 64: each history is one window
    (the mixers' no-state path); 20: up to 3 windows that carry state, checkpointed."""
    store, interaction = make_batch(LENGTHS)
    eager = make_model(store, MAX_ITEM_LIST_LENGTH=window)
    compiled = make_model(store, MAX_ITEM_LIST_LENGTH=window, compile_glue=True)
    compiled.load_state_dict(eager.state_dict())
    reference = train_and_score(eager, interaction, seed=0)
    external_ops_eager.clear()
    assert_same_run(train_and_score(compiled, interaction, seed=0), reference)
    assert graphs, "nothing was compiled"
    assert external_ops_eager and not any(external_ops_eager), "the scan or conv ran in a compiled region"


def assert_checkpointing_keeps_the_dropout_masks(model, interaction, monkeypatch):
    """With dropout on, every window but the last runs forward without gradients and again in
    backward (reentrant checkpoint, RNG state restored): the compiled no-grad forward and the
    recompute must draw the same masks, or the gradient is not the loss's. Same seed, with and
    without checkpointing: same loss and gradients."""
    checkpointed = train_and_score(model, interaction, seed=3)
    with monkeypatch.context() as patch:
        patch.setattr(lifelong, "checkpoint", lambda run, *args, use_reentrant: run(*args))
        assert_same_run(train_and_score(model, interaction, seed=3), checkpointed)


def test_checkpointed_windows_redraw_the_same_dropout(graphs, monkeypatch):
    store, interaction = make_batch(LENGTHS)
    model = make_model(store, MAX_ITEM_LIST_LENGTH=20, compile_glue=True, dropout_prob=0.3)
    assert_checkpointing_keeps_the_dropout_masks(model, interaction, monkeypatch)
    assert graphs, "nothing was compiled"


# inductor's C++ code generation imports modules that warn about torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_glue_with_inductor(monkeypatch):
    """The backend the option is for, once on CPU (a cold compile takes about 20 s on 2 cores):
    windows carrying state, dropout off. (Inductor's own dropout through checkpointing is
    checked on CUDA, tests/test_lifelong_gpu.py: another compile, too slow here.)"""
    monkeypatch.setattr(compiled_glue, "COMPILE_BACKEND", "inductor")
    torch._dynamo.reset()
    try:
        store, interaction = make_batch(LENGTHS)
        eager = make_model(store, MAX_ITEM_LIST_LENGTH=40)
        compiled = make_model(store, MAX_ITEM_LIST_LENGTH=40, compile_glue=True)
        compiled.load_state_dict(eager.state_dict())
        assert_same_run(train_and_score(compiled, interaction, seed=0), train_and_score(eager, interaction, seed=0))
    finally:
        torch._dynamo.reset()
        compiled_glue._compile.cache_clear()


def test_state_dict_is_the_same_with_compile_glue_on_or_off(graphs):
    store, interaction = make_batch([12, 7])
    on = make_model(store, compile_glue=True)
    off = make_model(store, compile_glue=False)
    assert on.state_dict().keys() == off.state_dict().keys()
    for name, value in on.state_dict().items():
        assert value.shape == off.state_dict()[name].shape, name
    with torch.no_grad():
        for p in on.parameters():
            p.add_(0.01 * torch.randn_like(p))
    off.load_state_dict(on.state_dict())  # strict: the same keys both ways
    on.load_state_dict(off.state_dict())
    on.eval(), off.eval()
    with torch.no_grad():
        torch.testing.assert_close(on.full_sort_predict(interaction), off.full_sort_predict(interaction),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["yes", 1, None, "auto"])
def test_compile_glue_must_be_a_bool_or_auto(value):
    store, _ = make_batch([3])
    if value in (None, "auto"):  # absent or null: the default, auto, which is off on the CPU
        assert LifelongRec(make_config(compile_glue=value), FakeDataset(store)).backbone.compile_glue is False
        return
    with pytest.raises(SSD4RecError, match="'compile_glue'"):
        LifelongRec(make_config(compile_glue=value), FakeDataset(store))


@pytest.mark.parametrize("backbone", ["mamba", "sasrec", "linrec"])
def test_other_backbones_ignore_compile_glue(backbone):
    store, interaction = make_batch([12, 7])
    model = LifelongRec(make_config(backbone=backbone, compile_glue=True), FakeDataset(store))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.full_sort_predict(interaction)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
def test_plain_gated_rms_norm_equals_the_module(dtype, groups):
    """The compiled regions' gated RMSNorm (here not compiled) against GatedRMSNorm."""
    g = torch.Generator().manual_seed(0)
    d = 32
    norm = GatedRMSNorm(d, eps=1e-5, group_size=d // groups)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    norm = norm.to(dtype)
    y, z = (torch.randn(7, d, generator=g).to(dtype) for _ in range(2))
    out = compiled_glue.gated_rms_norm(y, z, norm.weight, norm.eps, norm.group_size)
    assert out.dtype == dtype
    torch.testing.assert_close(out, norm(y, z))


def test_compile_glue_auto_means_on_for_cuda_only():
    from ssd4rec.modules.compiled_glue import resolve_compile_glue

    assert resolve_compile_glue("auto", torch.device("cuda")) is True
    assert resolve_compile_glue("auto", "cuda:1") is True
    assert resolve_compile_glue("auto", torch.device("cpu")) is False
    assert resolve_compile_glue("auto", None) is False
    assert resolve_compile_glue(True, torch.device("cpu")) is True
    assert resolve_compile_glue(False, torch.device("cuda")) is False
