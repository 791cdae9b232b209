"""Scaffolding shared by the LifelongRec tests (tests/test_lifelong.py, test_compiled_glue.py,
test_scan_rows.py, test_lifelong_gpu.py); not a test file itself.

It holds a stand-in for the dataset (the item count and the history store), the model's config,
a batch of packed histories, a model with weights of a trained model's scale, one training step
and the check that two runs agree. The defaults are the small CPU model of the CPU files (30
items, hidden size 16, chunks of 8, PyTorch ops); a file that tests another model (the GPU file)
passes its own values as arguments and config overrides.

Imported as ``tests.lifelong_support`` (pyproject.toml puts the repository root on the path).
"""

import math

import torch

from ssd4rec.models.lifelong import LifelongRec

N_ITEMS = 30


class FakeDataset:
    """What LifelongRec reads from its dataset (a PackedSequentialDataset): the item count and
    the history store."""

    def __init__(self, history_item, n_items=N_ITEMS):
        self.history_item = history_item
        self.n_items = n_items

    def num(self, field):
        assert field == "item_id"
        return self.n_items

    def history_store(self):
        return self.history_item, self.history_item.double()


def make_config(**overrides):
    """The small CPU model's config, with `overrides` set over it."""
    config = {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "device": torch.device("cpu"),
        "MAX_ITEM_LIST_LENGTH": 64, "backbone": "ssd", "hidden_size": 16, "num_layers": 2,
        "inner_size": 32, "dropout_prob": 0.0, "attn_dropout_prob": 0.0, "n_heads": 2,
        "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8, "chunk_size": 8,
        "layer_norm_eps": 1e-12, "backend": "torch", "loss_type": "CE",
    }
    config.update(overrides)
    return config


def make_batch(lengths, seed=0, n_items=N_ITEMS, device="cpu"):
    """One user per length (history, then its target) in one store; the interaction's rows.
    Drawn on the CPU, then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    store = torch.randint(1, n_items, (sum(lengths) + len(lengths),), generator=g)
    ends = torch.tensor(lengths).cumsum(0) + torch.arange(len(lengths))
    return store.to(device), {"history_end": ends.to(device), "item_length": torch.tensor(lengths).to(device)}


def make_model(store, seed=0, strong=True, **overrides):
    """LifelongRec on make_config(**overrides), initialised after torch.manual_seed(seed).

    strong: weights of a trained model's scale (SASRec's init, std 0.02, makes every mixer
    nearly silent, and a difference there would not show) and slow decays, so that what a state
    carries across windows shows."""
    torch.manual_seed(seed)
    model = LifelongRec(make_config(**overrides), FakeDataset(store))
    if strong:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("A_log"):
                    p.copy_(torch.log(torch.full_like(p, 0.05)))
                elif name.endswith("weight") and p.dim() == 2 and "conv1d" not in name:
                    p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]) if "embedding" not in name else 1.0)
    return model


def train_step(model, interaction, seed=None):
    """(loss, {name: grad}) of one training step; the RNG seeded first (dropout) when `seed` is
    given, left as it is when None."""
    model.train()
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    loss = model.calculate_loss(interaction)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def train_and_score(model, interaction, seed=None):
    """(loss, {name: grad}, full-sort scores in eval mode) of one training step (train_step)."""
    loss, grads = train_step(model, interaction, seed)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    return loss, grads, scores


def assert_same_run(a, b, rtol=1e-4, atol=1e-5):
    """Two train_and_score results: loss, the same parameters' gradients, scores."""
    (loss_a, grads_a, scores_a), (loss_b, grads_b, scores_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(scores_a, scores_b, rtol=rtol, atol=atol)


def assert_packed_equals_alone(model, interaction, lengths):
    """In eval mode, each history's scores and its share of the loss are the same in the packed
    batch as run alone (lengths: the histories' trained positions, for the loss weights)."""
    model.eval()
    with torch.no_grad():
        together = model.full_sort_predict(interaction)
        loss_sum = model.calculate_loss(interaction) * sum(lengths)
        alone_sum = 0.0
        for i, n in enumerate(lengths):
            one = {k: v[i:i + 1] for k, v in interaction.items()}
            torch.testing.assert_close(together[i], model.full_sort_predict(one)[0], rtol=1e-5, atol=1e-6)
            alone_sum = alone_sum + model.calculate_loss(one) * n
    torch.testing.assert_close(loss_sum, alone_sum, rtol=1e-5, atol=1e-5)
