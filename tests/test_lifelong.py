"""LifelongRec: all-position training, windows that carry state, packing, losses, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssd4rec.errors import SSD4RecError
from ssd4rec.models.lifelong import LifelongRec, plan_windows
from ssd4rec.modules.losses import chunked_cross_entropy, sample_negatives, sampled_bce_loss
from tests import lifelong_support
from tests.lifelong_support import N_ITEMS, FakeDataset, assert_packed_equals_alone, make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONES = ["ssd", "mamba", "linrec", "sasrec"]
RECURRENT = ["ssd", "mamba", "linrec"]


def make_store(lengths, seed=0):
    """One user per length: a history of that many items plus its target, in one store.
    Returns (store, interaction with history_end and item_length)."""
    g = torch.Generator().manual_seed(seed)
    parts, ends, offset = [], [], 0
    for n in lengths:
        parts.append(torch.randint(1, N_ITEMS, (n + 1,), generator=g))
        offset += n + 1
        ends.append(offset - 1)
    return torch.cat(parts), {"history_end": torch.tensor(ends), "item_length": torch.tensor(lengths)}


def make_model(lengths, seed=0, strong=True, **overrides):
    """(model, interaction): lifelong_support.make_model (torch.manual_seed(seed); strong: weights
    of a trained model's scale and slow decays) on the store of make_store(lengths, seed)."""
    store, interaction = make_store(lengths, seed)
    return lifelong_support.make_model(store, seed=seed, strong=strong, **overrides), interaction


def token_losses(model, interaction):
    """Per-token cross-entropy of the all-position run, keyed by store index."""
    source, y = model.encode_positions(interaction["history_end"], interaction["item_length"])
    losses = F.cross_entropy(y @ model.item_embedding.weight.T, model.history_item[source + 1], reduction="none")
    return dict(zip(source.tolist(), losses)), dict(zip(source.tolist(), y))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_position_gets_the_loss_of_a_prefix_run_ending_there(backbone):
    lengths = [11, 4]
    model, interaction = make_model(lengths, backbone=backbone)
    model.eval()
    with torch.no_grad():
        losses, outputs = token_losses(model, interaction)
        assert len(losses) == sum(lengths)
        for end, n in zip(interaction["history_end"].tolist(), lengths):
            first = end - n
            for t in range(1, n + 1):  # the prefix of t items: its last token is store index first + t - 1
                prefix = model.encode_last(torch.tensor([first + t]), torch.tensor([t]))[0]
                logits = prefix @ model.item_embedding.weight.T
                loss = F.cross_entropy(logits[None], model.history_item[first + t][None])
                torch.testing.assert_close(outputs[first + t - 1], prefix, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(losses[first + t - 1], loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", RECURRENT)
@pytest.mark.parametrize("window", [1, 3, 5])
def test_windows_carrying_state_equal_one_unwindowed_run(backbone, window):
    """Loss, every gradient and every evaluation score: windows of `window` tokens (histories
    of 1 to 4 windows, some shorter than the convolution) against one run of each history."""
    lengths = [13, 2, 7, 5, 1]
    model, interaction = make_model(lengths, backbone=backbone, MAX_ITEM_LIST_LENGTH=64)
    model.train()  # dropout 0: train mode, with checkpointing of all windows but the last

    def run(w):
        model.window = w
        model.zero_grad()
        loss = model.calculate_loss(interaction)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            model.eval()
            scores = model.full_sort_predict(interaction)
            model.train()
        return loss.detach(), grads, scores

    loss, grads, scores = run(64)
    loss_w, grads_w, scores_w = run(window)
    torch.testing.assert_close(loss_w, loss, rtol=1e-6, atol=1e-7)
    assert grads_w.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_w[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(scores_w, scores, rtol=1e-5, atol=1e-5)

    # The state matters here: windows that start from zero give other outputs.
    import ssd4rec.models.lifelong as lifelong

    model.eval()
    model.window = window
    with torch.no_grad():
        kept = model.encode_last(interaction["history_end"], interaction["item_length"])
        original = lifelong._unflatten
        lifelong._unflatten = lambda flat, layout: None
        try:
            dropped = model.encode_last(interaction["history_end"], interaction["item_length"])
        finally:
            lifelong._unflatten = original
    assert (dropped - kept).abs().max() > 0.02  # equality above holds to 1e-5


def test_sasrec_reads_the_last_window_only():
    lengths = [9, 3]
    model, interaction = make_model(lengths, backbone="sasrec", MAX_ITEM_LIST_LENGTH=4)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
        # the same as a history of only the last 4 items (3 for the short one)
        last = model.full_sort_predict({"history_end": interaction["history_end"], "item_length": torch.tensor([4, 3])})
    torch.testing.assert_close(scores, last)
    # training: every position once, in end-aligned windows [5, 9), [1, 5), [0, 1) and [0, 3)
    source, _ = model.encode_positions(interaction["history_end"], interaction["item_length"])
    ends = interaction["history_end"]
    expected = sorted(list(range(ends[0] - 9, ends[0])) + list(range(ends[1] - 3, ends[1])))
    assert sorted(source.tolist()) == expected


@pytest.mark.parametrize("backbone", BACKBONES)
def test_packed_histories_equal_each_history_alone(backbone):
    lengths = [9, 1, 14, 6]
    model, interaction = make_model(lengths, backbone=backbone, MAX_ITEM_LIST_LENGTH=6)
    assert_packed_equals_alone(model, interaction, lengths)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("loss_type", ["BCE", "CE"])
def test_gradients_reach_every_parameter(backbone, loss_type):
    model, interaction = make_model([10, 3, 6], backbone=backbone, loss_type=loss_type,
                                    MAX_ITEM_LIST_LENGTH=4, dropout_prob=0.2)
    model.train()
    loss = model.calculate_loss(interaction)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_learns_a_simple_rule(backbone):
    """next item = previous + 1 (mod 29): a few Adam steps on all positions lower the loss a lot."""
    lengths = [20, 12, 16]
    model, interaction = make_model(lengths, backbone=backbone, MAX_ITEM_LIST_LENGTH=8, strong=False)
    store = []
    for n, start in zip(lengths, (3, 10, 20)):
        store.append((torch.arange(start, start + n + 1) - 1) % (N_ITEMS - 1) + 1)
    model.history_item = torch.cat(store)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model.calculate_loss(interaction)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_predict_encodes_each_history_once_for_its_candidate_rows():
    model, interaction = make_model([8, 5], backbone="ssd")
    model.eval()
    repeated = {k: v.repeat_interleave(3) for k, v in interaction.items()}
    repeated["item_id"] = torch.tensor([1, 2, 3, 4, 5, 6])
    calls = []
    original = model.encode_last
    model.encode_last = lambda end, n: calls.append(end.numel()) or original(end, n)
    with torch.no_grad():
        scores = model.predict(repeated)
        full = model.full_sort_predict(interaction)
    assert calls[0] == 2
    torch.testing.assert_close(scores, full.repeat_interleave(3, 0)[torch.arange(6), repeated["item_id"]])


def test_plan_windows_covers_every_token_once():
    lengths = np.array([11, 8, 8, 3, 1])
    for aligned_to_end in (False, True):
        windows = plan_windows(lengths, 4, aligned_to_end)
        covered = [set() for _ in lengths]
        for k, win in enumerate(windows):
            assert win.n == (lengths > 4 * k).sum() and (win.lengths >= 1).all() and (win.lengths <= 4).all()
            assert win.more == bool((lengths[:win.n] > 4 * (k + 1)).any())
            for i in range(win.n):
                tokens = set(range(win.lo[i], win.lo[i] + win.lengths[i]))
                assert not tokens & covered[i]
                covered[i] |= tokens
        assert all(c == set(range(n)) for c, n in zip(covered, lengths))
    start = plan_windows(lengths, 4, aligned_to_end=False)
    end = plan_windows(lengths, 4, aligned_to_end=True)
    assert list(start[0].lo) == [0] * 5 and list(start[1].lo) == [4, 4, 4]
    assert list(end[0].lo) == [7, 4, 4, 0, 0]  # the last 4 items of each history first


@pytest.mark.parametrize("key,value", [("backbone", "transformer"), ("loss_type", "BPR")])
def test_bad_config_values_name_their_key(key, value):
    store, _ = make_store([3])
    with pytest.raises(SSD4RecError, match=f"'{key}'"):
        LifelongRec(make_config(**{key: value}), FakeDataset(store))


def test_chunked_cross_entropy_equals_cross_entropy():
    import ssd4rec.modules.losses as losses

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 6, generator=g, requires_grad=True)
    W = torch.randn(11, 6, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (37,), generator=g)
    old = losses._CE_BLOCK_ELEMENTS
    losses._CE_BLOCK_ELEMENTS = 11 * 5  # blocks of 5 tokens, the last one partial
    try:
        ours = chunked_cross_entropy(h, W, targets)
    finally:
        losses._CE_BLOCK_ELEMENTS = old
    ref = F.cross_entropy(h @ W.T, targets, reduction="sum")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours * 0.5, (h, W)), torch.autograd.grad(ref * 0.5, (h, W)))


def test_negatives_are_uniform_over_the_other_items():
    targets = torch.randint(1, 8, (40000,), generator=torch.Generator().manual_seed(0))
    neg = sample_negatives(targets, 8, generator=torch.Generator().manual_seed(1))
    assert (neg != targets).all() and neg.min() >= 1 and neg.max() <= 7
    counts = torch.bincount(neg, minlength=8)[1:].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05
    # the loss is SASRec's: -log sigmoid(pos) - log(1 - sigmoid(neg))
    h, W = torch.randn(3, 4), torch.randn(8, 4)
    t, n = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    pos, negl = (h * W[t]).sum(-1), (h * W[n]).sum(-1)
    expected = -(torch.log(torch.sigmoid(pos)) + torch.log(1 - torch.sigmoid(negl))).sum()
    torch.testing.assert_close(sampled_bce_loss(h, W, t, n), expected)
    assert math.isfinite(expected.item())
