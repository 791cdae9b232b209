"""The ssd mixer's multi-row layout (``scan_row_tokens``): the row plan, and that running the
packed windows as rows computes what the one packed row computes, values and gradients.

CPU, PyTorch ops; the GPU kernels (Triton scan, causal_conv1d) are checked in
tests/test_lifelong_gpu.py.
"""

import math

import numpy as np
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from ssd4rec.errors import SSD4RecError
from ssd4rec.models.lifelong import SCAN_ROW_TOKENS, LifelongRec
from ssd4rec.modules import compiled_glue
from ssd4rec.modules.segments import Segments, plan_rows
from ssd4rec.modules.stateful import StatefulMamba2Mixer
from tests.lifelong_support import (FakeDataset, assert_packed_equals_alone, assert_same_run, make_batch,
                                    make_config, make_model, train_and_score)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [45, 30, 25, 12, 7, 1, 19]  # T = 139


# --------------------------------------------------------------------------------------------
# The row plan
# --------------------------------------------------------------------------------------------
def segments(lengths):
    return Segments(torch.tensor(lengths), sum(lengths), max(lengths), host_lengths=lengths)


def check_layout(lengths, target):
    """Every property of the plan and of the layout built from it; returns the layout."""
    B, T = len(lengths), sum(lengths)
    row, start, used = plan_rows(np.array(lengths), target)
    # whole sequences, in packed order, end to end in their rows
    assert (np.diff(row) >= 0).all() and row[0] == 0 and (np.diff(row) <= 1).all()
    for r in range(used.size):
        members = np.flatnonzero(row == r)
        assert members.size >= 1
        sizes = np.asarray(lengths)[members]
        assert list(start[members]) == list(np.cumsum(sizes) - sizes)
        assert used[r] == sizes.sum()
        assert used[r] <= target or members.size == 1, (r, used[r])
    layout = segments(lengths).row_layout(target)
    if used.size == 1:
        assert layout is None  # one row: the packed stream itself
        return None
    R, Lr = layout.rows, layout.row_len
    assert (R, Lr) == (used.size, used.max())
    assert layout.seq_idx.shape == (R, Lr) and layout.seq_idx.dtype == torch.int32
    assert (layout.seq_idx[:, 1:] >= layout.seq_idx[:, :-1]).all()
    # padding: exactly the row ends, seq id B (after every real sequence)
    is_pad = torch.arange(Lr)[None, :] >= torch.from_numpy(used)[:, None]  # (R, Lr)
    assert sorted(layout.padding.tolist()) == torch.nonzero(is_pad.flatten()).flatten().tolist()
    assert (layout.seq_idx[is_pad] == B).all() and (layout.seq_idx[~is_pad] < B).all()
    # the maps: a permutation of the real positions, and back
    assert torch.equal(layout.index[layout.inverse], torch.arange(T))
    assert sorted(layout.inverse.tolist() + layout.padding.tolist()) == list(range(R * Lr))
    seq = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths)).int()
    assert torch.equal(layout.seq_idx.flatten()[layout.inverse], seq)
    return layout


@pytest.mark.parametrize("lengths,target", [
    (LENGTHS, 50),
    (LENGTHS, 40),
    ([5, 3, 7, 1, 2, 9], 8),
    ([2000] * 256, 32768),  # Rec-Mamba's batch: 16 rows of 32,000, no padding
    ([2000] * 50, 32768),  # balanced: 5 rows of 20,000, not 4 of 32,000 and one of 4,000
])
def test_rows_hold_whole_sequences_in_order(lengths, target):
    check_layout(lengths, target)


def test_row_plan_edge_cases():
    assert check_layout([17], 4) is None  # one sequence: one row, however long
    layout = check_layout([9, 7, 5], 4)  # every sequence longer than the target: one row each
    assert (layout.rows, layout.row_len) == (3, 9)
    assert check_layout(LENGTHS, sum(LENGTHS)) is None and check_layout(LENGTHS, 10 ** 6) is None
    layout = check_layout([1] * 10, 3)  # lengths of 1: 5 rows of 2 (no padding), not 3 + 3 + 3 + 1
    assert (layout.rows, layout.row_len) == (5, 2) and layout.padding.numel() == 0
    assert segments(LENGTHS).row_layout(0) is None and segments(LENGTHS).row_layout(None) is None


@pytest.mark.parametrize("seed", range(5))
def test_random_plans(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=rng.integers(1, 40)).tolist()
    for target in (1, 7, 50, 64, 200):
        check_layout(lengths, target)


def test_a_cpu_segments_plans_without_host_lengths():
    with_host = segments(LENGTHS).row_layout(40)
    without = Segments(torch.tensor(LENGTHS), sum(LENGTHS), max(LENGTHS)).row_layout(40)
    for name in ("index", "inverse", "padding", "seq_idx"):
        assert torch.equal(getattr(with_host, name), getattr(without, name)), name


def test_gathers_are_each_others_inverse_and_their_own_gradients():
    """to_rows / from_rows: zeros on padding, round trip, and gradients as autograd's own."""
    layout = segments(LENGTHS).row_layout(40)
    T = sum(LENGTHS)
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    rows = layout.to_rows(x)
    assert rows.shape == (layout.rows, layout.row_len, 3)
    assert (rows.flatten(0, 1)[layout.padding] == 0).all()
    assert torch.equal(layout.from_rows(rows), x)
    torch.autograd.gradcheck(layout.to_rows, (x,))
    y = torch.randn(layout.rows, layout.row_len, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layout.from_rows, (y,))


# --------------------------------------------------------------------------------------------
# The mixer on rows equals the mixer on one row
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align_conv", [False, True])
def test_mixer_on_rows_equals_one_row(align_conv):
    """float64, so that only rounding at 1e-12 could differ. align_conv: the conv's channels
    padded to a multiple of 8 (what runs on CUDA), with R rows."""
    torch.manual_seed(0)
    mixer = StatefulMamba2Mixer(8, d_state=6, d_conv=4, expand=2, headdim=4, chunk_size=8,
                                backend="torch").double()
    mixer.align_conv = align_conv
    with torch.no_grad():
        mixer.A_log.fill_(math.log(0.05))  # slow decays: what the state carries shows
    u = torch.randn(sum(LENGTHS), 8, dtype=torch.float64)
    outputs = []
    for target in (None, 40):
        mixer.scan_row_tokens = target
        mixer.zero_grad()
        x = u.clone().requires_grad_()
        seg = segments(LENGTHS)
        out, state = mixer.forward_segments(x, seg)
        y, z, _ = mixer.scan_segments(x, seg)
        assert state is None
        (out.square().sum() + (y * z).sum()).backward()
        grads = [x.grad] + [p.grad.clone() for p in mixer.parameters()]
        outputs.append((out.detach(), y.detach(), z.detach(), grads))
    assert segments(LENGTHS).row_layout(40).rows > 1
    for a, b in zip(outputs[0][:3] + tuple(outputs[0][3]), outputs[1][:3] + tuple(outputs[1][3])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_state_path_keeps_one_row():
    mixer = StatefulMamba2Mixer(8, d_state=6, headdim=4, chunk_size=8, backend="torch")
    mixer.scan_row_tokens = 40
    seg = segments(LENGTHS)
    u = torch.randn(sum(LENGTHS), 8)
    _, state = mixer.forward_segments(u, seg, want_state=True)
    assert mixer._row_layout(seg, None, True) is None and mixer._row_layout(seg, state, False) is None
    assert mixer._row_layout(seg, None, False) is not None


# --------------------------------------------------------------------------------------------
# LifelongRec with rows on and off
# --------------------------------------------------------------------------------------------
# (the model, its batch and its training step: tests/lifelong_support.py)
@pytest.fixture
def layouts(monkeypatch):
    """The (rows, row length) of every multi-row layout the mixers use."""
    used = []
    original = Segments.row_layout

    def spy(self, target):
        layout = original(self, target)
        if layout is not None:
            used.append((layout.rows, layout.row_len))
        return layout

    monkeypatch.setattr(Segments, "row_layout", spy)
    return used


@pytest.fixture
def aot_eager(monkeypatch):
    """compile_glue through aot_eager (the same graphs as inductor, compiled in a second),
    with fresh dynamo caches."""
    monkeypatch.setattr(compiled_glue, "COMPILE_BACKEND", lookup_backend("aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    compiled_glue._compile.cache_clear()


def rows_on_and_off(store, interaction, target, **overrides):
    off = make_model(store, scan_row_tokens=0, **overrides)
    on = make_model(store, scan_row_tokens=target, **overrides)
    on.load_state_dict(off.state_dict())
    return train_and_score(on, interaction), train_and_score(off, interaction)


@pytest.mark.parametrize("window", [64, 20])
def test_lifelong_rows_on_equals_off(window, layouts):
    """Loss, every parameter's gradient, eval scores. window 64: every history one window
    (the rows path); 20: histories longer than the window, so every window of the batch
    carries a state in or out and keeps one row (the setting changes nothing there)."""
    store, interaction = make_batch(LENGTHS)
    on, off = rows_on_and_off(store, interaction, 40, MAX_ITEM_LIST_LENGTH=window)
    assert_same_run(on, off)
    assert bool(layouts) == (window == 64) and all(rows > 1 for rows, _ in layouts)


@pytest.mark.parametrize("window", [64, 20])
def test_lifelong_rows_on_equals_off_with_compile_glue(window, layouts, aot_eager):
    store, interaction = make_batch(LENGTHS)
    on, off = rows_on_and_off(store, interaction, 40, MAX_ITEM_LIST_LENGTH=window, compile_glue=True)
    assert_same_run(on, off)
    assert bool(layouts) == (window == 64)
    eager_off = make_model(store, scan_row_tokens=0, MAX_ITEM_LIST_LENGTH=window)
    assert_same_run(on, train_and_score(eager_off, interaction))


def test_packed_histories_equal_each_history_alone_on_rows(layouts):
    lengths = [9, 1, 14, 6, 20, 3]
    store, interaction = make_batch(lengths)
    model = make_model(store, MAX_ITEM_LIST_LENGTH=32, scan_row_tokens=16)
    assert_packed_equals_alone(model, interaction, lengths)
    assert layouts  # the packed batch ran on rows (a history alone is always one row)


# --------------------------------------------------------------------------------------------
# The config key
# --------------------------------------------------------------------------------------------
def mixers(model):
    return [layer.mixer for layer in model.backbone.layers]


@pytest.mark.parametrize("value", ["many", -1, True, 2.5])
def test_bad_scan_row_tokens_name_the_key(value):
    store, _ = make_batch([3])
    with pytest.raises(SSD4RecError, match="'scan_row_tokens'"):
        LifelongRec(make_config(scan_row_tokens=value), FakeDataset(store))


def test_scan_row_tokens_default_and_off():
    store, _ = make_batch([3])
    assert SCAN_ROW_TOKENS == 0  # the default is one row (lifelongrec.yaml says why)
    assert all(m.scan_row_tokens is None for m in mixers(LifelongRec(make_config(), FakeDataset(store))))
    for off in (0, None):
        model = LifelongRec(make_config(scan_row_tokens=off), FakeDataset(store))
        assert all(m.scan_row_tokens is None for m in mixers(model))
