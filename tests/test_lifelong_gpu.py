"""LifelongRec on the GPU kernels against the same model on the PyTorch ops, on one GPU.

Skipped without CUDA, mamba_ssm's Triton SSD kernels and causal_conv1d (the CPU CI). On the
GPU the ssd and linrec backbones run mamba_ssm's Triton scan (TF32 dots: agreement at the
1e-3 level, see tests/test_gpu.py) and the ssd backbone causal_conv1d on channels padded to
a multiple of 8; the windowed runs also exercise the state carried between windows.
First use compiles the Triton kernels (autotuning is skipped: see tests/conftest.py). The
compile_glue tests also compile the ssd backbone's glue with inductor (a minute or less each).
"""

import importlib

import pytest
import torch

from ssd4rec.models.lifelong import LifelongRec
from tests.lifelong_support import FakeDataset, make_batch, make_config, train_and_score, train_step

ssd_mod = importlib.import_module("ssd4rec.ops.ssd_scan")
conv_mod = importlib.import_module("ssd4rec.ops.conv1d")


def _gpu_kernels_available():
    if not torch.cuda.is_available():
        return False
    return ssd_mod._load_triton_scan()[0] is not None and conv_mod._load_cuda_conv1d()[0] is not None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _gpu_kernels_available(), reason="needs CUDA and mamba_ssm/causal_conv1d"),
              pytest.mark.usefixtures("pinned_triton_configs")]  # tests/conftest.py says why

N_ITEMS = 200
LENGTHS = [300, 75, 141, 8]


def config(backbone, backend, window):
    """This file's model, larger than the CPU files' (tests/lifelong_support.py), on CUDA."""
    return make_config(
        device=torch.device("cuda"), MAX_ITEM_LIST_LENGTH=window, backbone=backbone, hidden_size=50,
        inner_size=50, n_heads=1, d_state=32, headdim=25, chunk_size=64, backend=backend,
        compile_glue=False,  # these tests are about the kernels; the compile_glue tests set it
    )


def dataset(history_item):
    return FakeDataset(history_item, n_items=N_ITEMS)


def lifelong_batch():
    return make_batch(LENGTHS, n_items=N_ITEMS, device="cuda")


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("backbone", ["ssd", "linrec", "mamba"])
@pytest.mark.parametrize("window", [1000, 70])
def test_gpu_kernels_match_the_pytorch_ops(backbone, window):
    store, interaction = lifelong_batch()
    results, reference_state = [], None
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        model = LifelongRec(config(backbone, backend, window), dataset(store)).cuda()
        if reference_state is None:
            reference_state = model.state_dict()
        else:
            model.load_state_dict(reference_state)
        model.train()
        loss = model.calculate_loss(interaction)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.eval()
        with torch.no_grad():
            scores = model.full_sort_predict(interaction)
        results.append((loss.detach(), grads, scores))
    (loss_t, grads_t, scores_t), (loss_g, grads_g, scores_g) = results
    assert rel(loss_g, loss_t) < 1e-3
    assert rel(grads_g, grads_t) < 5e-3
    assert rel(scores_g, scores_t) < 5e-3


def assert_close_steps(a, b):
    """Same kernels on both sides, fp32: only rounding (and mamba_ssm's atomic adds) differ.
    Per parameter looser: a small gradient (of a near-silent mixer at SASRec's init) is a sum
    that cancels; a parameter the compiled path left out would be off by 100%."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert rel(loss_a, loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    assert rel(torch.cat([g.flatten() for g in grads_a.values()]),
               torch.cat([g.flatten() for g in grads_b.values()])) < 1e-4
    for name in grads_a:
        assert rel(grads_a[name], grads_b[name]) < 1e-2, name


@pytest.mark.parametrize("window", [1000, 70])
def test_compiled_glue_matches_eager(window, fresh_dynamo):
    """compile_glue (inductor, fp32) against the eager ssd model, both on the GPU kernels: loss,
    every gradient, eval scores. window 70: windows carrying state, checkpointed."""
    assert fresh_dynamo.COMPILE_BACKEND == "inductor"
    store, interaction = lifelong_batch()
    eager, compiled = (LifelongRec({**config("ssd", "auto", window), "compile_glue": on}, dataset(store)).cuda()
                       for on in (False, True))
    compiled.load_state_dict(eager.state_dict())
    (*step_eager, scores_eager), (*step_compiled, scores_compiled) = (
        train_and_score(model, interaction, seed=0) for model in (eager, compiled))
    assert_close_steps(step_compiled, step_eager)
    assert rel(scores_compiled, scores_eager) < 1e-4


def test_compiled_glue_dropout_survives_checkpointing(fresh_dynamo, monkeypatch):
    """Dropout on, windows of 70 (all but the last checkpointed, reentrant): the compiled
    no-grad forward and its recompute in backward draw the same masks from inductor's RNG, so
    loss and gradients equal the same step without checkpointing (same seed)."""
    import ssd4rec.models.lifelong as lifelong

    store, interaction = lifelong_batch()
    torch.manual_seed(0)
    model = LifelongRec({**config("ssd", "auto", 70), "compile_glue": True, "dropout_prob": 0.3},
                        dataset(store)).cuda()
    checkpointed = train_step(model, interaction, seed=3)
    monkeypatch.setattr(lifelong, "checkpoint", lambda run, *args, use_reentrant: run(*args))
    assert_close_steps(train_step(model, interaction, seed=3), checkpointed)


@pytest.mark.parametrize("compile_glue", [False, True])
def test_scan_rows_match_one_row(compile_glue, fresh_dynamo, monkeypatch):
    """scan_row_tokens (the ssd mixers on rows of whole histories) against one packed row,
    both on the Triton scan and causal_conv1d (channels padded to 8, R rows), fp32: loss,
    every gradient, eval scores. Every history fits the window: the no-state path, as rows."""
    from ssd4rec.modules.segments import Segments

    used = []
    original = Segments.row_layout

    def spy(self, target):
        used.append(original(self, target))
        return used[-1]

    monkeypatch.setattr(Segments, "row_layout", spy)
    store, interaction = lifelong_batch()
    one_row, rows = (LifelongRec({**config("ssd", "auto", 1000), "compile_glue": compile_glue,
                                  "scan_row_tokens": target}, dataset(store)).cuda()
                     for target in (0, 200))
    rows.load_state_dict(one_row.state_dict())
    (*step_one, scores_one), (*step_rows, scores_rows) = (
        train_and_score(model, interaction, seed=0) for model in (one_row, rows))
    assert used and all(layout is not None and layout.rows > 1 for layout in used)
    assert_close_steps(step_rows, step_one)
    assert rel(scores_rows, scores_one) < 1e-4
