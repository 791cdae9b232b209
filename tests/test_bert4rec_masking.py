"""ssd4rec.data.bert4rec_masking: RecBole's MaskItemSequence with tensor ops (compat item 6)."""

import importlib.util
import random

import pytest
import torch

import ssd4rec  # noqa: F401  (applies the patches)
import recbole.data.transform
from recbole.data.interaction import Interaction
from ssd4rec import compat
from ssd4rec.data import bert4rec_masking as bm

SEQ, LEN, MASK_SEQ, POS, NEG, INDEX = (
    "item_id_list", "item_length", "Mask_item_id_list", "Pos_item_id", "Neg_item_id", "MASK_INDEX",
)
OUTPUTS = (MASK_SEQ, POS, NEG, INDEX)


class StubConfig(dict):
    """The part of RecBole's Config that MaskItemSequence reads (keys also as attributes)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class StubDataset:
    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        assert field == "item_id"
        return self.n_items


def make_config(max_len, mask_ratio, ft_ratio=None):
    config = StubConfig(
        ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list", ITEM_LIST_LENGTH_FIELD=LEN,
        MAX_ITEM_LIST_LENGTH=max_len, mask_ratio=mask_ratio, transform="mask_itemseq",
    )
    if ft_ratio is not None:
        config["ft_ratio"] = ft_ratio
    return config


def make_batch(rows, max_len):
    seq = torch.zeros(len(rows), max_len, dtype=torch.long)
    for b, row in enumerate(rows):
        seq[b, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    return Interaction({SEQ: seq, LEN: lengths, "item_id": torch.arange(1, len(rows) + 1)})


def unpatched_transform_module():
    """A fresh copy of recbole/data/transform.py: RecBole's own code, whatever compat patched."""
    spec = importlib.util.spec_from_file_location(
        "_recbole_transform_unpatched", recbole.data.transform.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedRandom:
    """Stands in for the `random` module in RecBole's transform: scripted draws, in order."""

    def __init__(self, uniforms, ints, n_items):
        self.uniforms, self.ints, self.n_items = list(uniforms), list(ints), n_items

    def random(self):
        return self.uniforms.pop(0)

    def randint(self, low, high):
        assert (low, high) == (1, self.n_items - 1)
        return self.ints.pop(0)


N_ITEMS = 40
MAX_LEN = 10
MASK_RATIO = 0.3  # K = int(0.3 * 10) = 3
K = 3
# (row, masked positions): more masks than K, none, a full row, length-1 rows (masked and
# not), exactly K, and a 0 in the middle (RecBole's loop stops there: 9 and 8 are never masked).
CASES = [
    ([5, 9, 12, 3, 7, 21, 30, 2], [0, 2, 3, 5, 7]),
    ([4, 6, 8, 10, 11, 13], []),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 39], [0, 4, 5, 8, 9]),
    ([17], [0]),
    ([18], []),
    ([22, 23, 24, 25], [1, 2, 3]),
    ([14, 15, 0, 9, 8], [1]),
]


def scripted_draws(cases, mask_ratio, first_uniform):
    """RecBole's draws reproducing `cases`, and the negatives RecBole should end up with.

    Every other mask's first two scripted negatives are items of its row, so RecBole's redraw
    loop runs.
    """
    uniforms, ints = [first_uniform], []
    negatives = torch.zeros(len(cases), MAX_LEN, dtype=torch.long)
    count = 0
    for b, (row, masked) in enumerate(cases):
        outside = [i for i in range(1, N_ITEMS) if i not in row]
        for position, item in enumerate(row):
            if item == 0:
                break
            # Just below / exactly at the threshold: RecBole masks when random() < mask_ratio.
            uniforms.append(mask_ratio - 1e-9 if position in masked else mask_ratio)
            if position in masked:
                if count % 2 == 0:
                    ints += [row[(count // 2) % len(row)], row[0]]  # two collisions first
                negative = outside[(7 * count) % len(outside)]
                ints.append(negative)
                negatives[b, position] = negative
                count += 1
    mask = torch.zeros(len(cases), MAX_LEN, dtype=torch.bool)
    for b, (_, masked) in enumerate(cases):
        mask[b, masked] = True
    return uniforms, ints, mask, negatives


def test_mask_items_equals_recbole_loop_given_the_same_draws(monkeypatch):
    original = unpatched_transform_module()
    rows = [row for row, _ in CASES]
    uniforms, ints, mask, negatives = scripted_draws(CASES, MASK_RATIO, first_uniform=0.99)
    scripted = ScriptedRandom(uniforms, ints, N_ITEMS)
    monkeypatch.setattr(original, "random", scripted)
    config = make_config(MAX_LEN, MASK_RATIO, ft_ratio=0.5)
    batch = make_batch(rows, MAX_LEN)
    expected = original.MaskItemSequence(config)(StubDataset(N_ITEMS), make_batch(rows, MAX_LEN))
    assert scripted.uniforms == [] and scripted.ints == []  # the script matched RecBole's draws

    # Positions RecBole never draws for (padding, and after a 0 in the middle) marked too:
    # the construction must ignore them.
    beyond_first_zero = torch.ones_like(mask)
    for b, row in enumerate(rows):
        beyond_first_zero[b, : (row + [0]).index(0)] = False
    got = bm.mask_items(batch[SEQ], mask | beyond_first_zero, negatives, N_ITEMS, K)
    for name, tensor in zip(OUTPUTS, got):
        assert tensor.dtype == expected[name].dtype == torch.long
        assert tensor.shape == expected[name].shape
        assert torch.equal(tensor, expected[name]), name
    # The cases do what they claim: first row keeps its last 3 of 5 masks, the full row its
    # mask at the last position, the row without masks is all padding.
    assert expected[INDEX][0].tolist() == [3, 5, 7]
    assert expected[INDEX][2].tolist() == [5, 8, 9]
    assert expected[MASK_SEQ][2, 9] == N_ITEMS
    assert expected[POS][1].tolist() == [0, 0, 0]
    assert expected[POS][3].tolist() == [0, 0, 17]
    assert expected[MASK_SEQ][6].tolist() == [14, N_ITEMS, 0, 9, 8, 0, 0, 0, 0, 0]


def test_mask_last_equals_recbole_ft_branch_given_the_same_draws(monkeypatch):
    original = unpatched_transform_module()
    rows = [row for row, _ in CASES if 0 not in row]
    outside = [[i for i in range(1, N_ITEMS) if i not in row] for row in rows]
    negatives = torch.tensor([o[3 * b % len(o)] for b, o in enumerate(outside)])
    ints = []
    for b, row in enumerate(rows):
        ints += [row[-1]] * (b % 3) + [negatives[b].item()]  # 0, 1 or 2 collisions first
    # 0.49 < ft_ratio 0.5: the whole batch takes _append_mask_last.
    scripted = ScriptedRandom([0.49], ints, N_ITEMS)
    monkeypatch.setattr(original, "random", scripted)
    batch = make_batch(rows, MAX_LEN)
    expected = original.MaskItemSequence(make_config(MAX_LEN, MASK_RATIO, ft_ratio=0.5))(
        StubDataset(N_ITEMS), batch
    )
    assert scripted.uniforms == [] and scripted.ints == []
    assert expected is not batch and MASK_SEQ not in batch  # RecBole's deep copy

    got = bm.mask_last(batch[SEQ], batch[LEN], negatives, N_ITEMS, K)
    for name, tensor in zip(OUTPUTS, got):
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape
        assert torch.equal(tensor, expected[name]), name
    assert expected[INDEX][:, -1].tolist() == [len(row) - 1 for row in rows]


def check_consistent(batch_in, out, n_items, k):
    """What any output of RecBole's transform satisfies, whatever its draws."""
    seq, lengths = batch_in[SEQ], batch_in[LEN]
    masked_seq, pos, neg, index = (out[name] for name in OUTPUTS)
    assert masked_seq.shape == seq.shape and pos.shape == neg.shape == index.shape == (seq.size(0), k)
    assert all(out[name].dtype == torch.long for name in OUTPUTS)
    positions = torch.arange(seq.size(1))
    is_mask = masked_seq == n_items
    assert not (is_mask & (positions >= lengths[:, None])).any()  # padding never masked
    assert torch.equal(torch.where(is_mask, seq, masked_seq), seq)  # nothing else changed
    for b in range(seq.size(0)):
        masked = is_mask[b].nonzero().view(-1).tolist()
        kept = masked[-k:]
        pad = k - len(kept)
        assert index[b].tolist() == [0] * pad + kept
        assert pos[b].tolist() == [0] * pad + seq[b, kept].tolist()
        assert neg[b, :pad].eq(0).all()
        row = set(seq[b].tolist())
        assert all(1 <= v < n_items and v not in row for v in neg[b, pad:].tolist())


def test_patched_transform_outputs_are_consistent():
    transform = recbole.data.transform.MaskItemSequence(make_config(MAX_LEN, MASK_RATIO, ft_ratio=0.3))
    dataset = StubDataset(N_ITEMS)
    random.seed(3)
    ft = 0
    for _ in range(50):
        rows = [random.sample(range(1, N_ITEMS), random.randint(1, MAX_LEN)) for _ in range(16)]
        batch = make_batch(rows, MAX_LEN)
        out = transform(dataset, batch)
        check_consistent(batch, out, N_ITEMS, K)
        if out is not batch:  # the fine-tuning branch: only the last item, on a copy
            ft += 1
            assert MASK_SEQ not in batch
            assert out[INDEX][:, -1].tolist() == (batch[LEN] - 1).tolist()
            assert out[INDEX][:, :-1].eq(0).all()
    assert 0 < ft < 50


def random_batch(generator, batch_size, max_len, n_items):
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=generator)
    seq = torch.randint(1, n_items, (batch_size, max_len), generator=generator)
    seq[torch.arange(max_len) >= lengths[:, None]] = 0
    return Interaction({SEQ: seq, LEN: lengths})


def test_mask_rate_and_negatives_over_many_draws():
    n_items, max_len, mask_ratio = 60, 50, 0.2  # rows cover up to ~half the items: many redraws
    transform = recbole.data.transform.MaskItemSequence(make_config(max_len, mask_ratio))
    assert transform.ft_ratio == 0  # no ft_ratio in the config: RecBole's default
    g = torch.Generator().manual_seed(0)
    random.seed(0)
    masked = valid = 0
    for _ in range(20):
        batch = random_batch(g, 256, max_len, n_items)
        out = transform(StubDataset(n_items), batch)
        check_consistent(batch, out, n_items, int(mask_ratio * max_len))
        masked += (out[MASK_SEQ] == n_items).sum().item()
        valid += batch[LEN].sum().item()
    assert valid > 100_000
    assert abs(masked / valid - mask_ratio) < 0.005  # ~6 standard deviations


def test_draw_mask_stops_at_the_first_zero_like_recbole():
    seq = torch.tensor([[14, 15, 0, 9, 8], [3, 4, 5, 6, 7], [0, 0, 0, 0, 0]])
    mask = bm.draw_mask(seq, 1.0, torch.Generator().manual_seed(0))
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5, [False] * 5]


def test_negatives_are_uniform_over_the_items_outside_the_row():
    n_items = 50
    row = torch.arange(1, 41)  # items 1..40: a negative must be one of 41..49, each 1/9
    seq = row.repeat(4000, 1)
    random.seed(1)
    generator = bm.masking_generator(object.__new__(recbole.data.transform.MaskItemSequence))
    rows = torch.arange(seq.size(0)).repeat_interleave(5)
    negatives = bm.draw_negatives(seq, rows, n_items, generator)
    counts = torch.bincount(negatives, minlength=n_items)
    assert counts[:41].sum() == 0 and counts[41:].sum() == negatives.numel()
    expected = negatives.numel() / 9
    assert ((counts[41:] - expected).abs() < 5 * (expected * 8 / 9) ** 0.5).all()


def test_ft_ratio_branch_rate():
    transform = recbole.data.transform.MaskItemSequence(make_config(MAX_LEN, MASK_RATIO, ft_ratio=0.25))
    random.seed(2)
    rows = [[1, 2, 3], [4, 5, 6, 7]]
    ft = 0
    for _ in range(2000):
        batch = make_batch(rows, MAX_LEN)
        ft += transform(StubDataset(N_ITEMS), batch) is not batch
    assert abs(ft / 2000 - 0.25) < 0.04  # ~4 standard deviations


def run_transform(seed, batches):
    random.seed(seed)
    transform = recbole.data.transform.MaskItemSequence(make_config(50, 0.2, ft_ratio=0.5))
    return [transform(StubDataset(100), Interaction({k: v.clone() for k, v in b.interaction.items()}))
            for b in batches]


def test_same_python_seed_same_masks_and_torch_rng_untouched():
    g = torch.Generator().manual_seed(5)
    batches = [random_batch(g, 64, 50, 100) for _ in range(6)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run_transform(11, batches)
    assert torch.equal(torch.get_rng_state(), before)
    second = run_transform(11, batches)
    other = run_transform(12, batches)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(first, second) for n in OUTPUTS)
    assert not all(torch.equal(a[n], b[n]) for a, b in zip(first, other) for n in OUTPUTS)


def test_mask_item_length_zero_is_refused():
    transform = recbole.data.transform.MaskItemSequence(make_config(4, 0.2))  # int(0.8) = 0
    with pytest.raises(ValueError, match="no room"):
        transform(StubDataset(N_ITEMS), make_batch([[1, 2]], 4))


def test_compat_installs_it_idempotently():
    compat.apply()
    compat.apply()
    from recbole.data.transform import MaskItemSequence, construct_transform

    assert MaskItemSequence.__call__ is bm.mask_item_sequence_call
    assert MaskItemSequence._append_mask_last is bm.append_mask_last
    transform = construct_transform(make_config(MAX_LEN, MASK_RATIO))
    assert type(transform).__call__ is bm.mask_item_sequence_call
