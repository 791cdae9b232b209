"""The vectorised packing equals a plain Python collate, token for token."""

import random

import pytest
import torch

from ssd4rec.data.packing import history_bounds, pack_batch, segment_layout


def random_store(num_users, max_len, seed):
    """Histories of random lengths laid out CSR-style, as the dataset stores them."""
    rng = random.Random(seed)
    users, items, times = [], [], []
    for user in range(num_users):
        length = rng.randint(1, max_len)
        users += [user] * length
        items += [rng.randint(1, 50) for _ in range(length)]
        times += sorted(rng.uniform(0, 1e9) for _ in range(length))
    return torch.tensor(users), torch.tensor(items), torch.tensor(times, dtype=torch.float64)


def reference_collate(users, items, times, sample_ids, max_length):
    """The obvious loop: for each sample, walk back through its user's history."""
    packed_items, packed_times, seq_idx, reverse, last, targets = [], [], [], [], [], []
    for b, i in enumerate(sample_ids):
        start = i
        while start > 0 and users[start - 1] == users[i] and (max_length is None or i - start < max_length):
            start -= 1
        offset = len(packed_items)
        history = list(range(start, i))
        packed_items += [int(items[j]) for j in history]
        packed_times += [float(times[j]) for j in history]
        seq_idx += [b] * len(history)
        reverse += [offset + len(history) - 1 - k for k in range(len(history))]
        last.append(len(packed_items) - 1)
        targets.append(int(items[i]))
    return packed_items, packed_times, seq_idx, reverse, last, targets


@pytest.mark.parametrize("max_length", [None, 1, 3, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_batch_equals_python_collate(max_length, seed):
    users, items, times = random_store(num_users=12, max_len=15, seed=seed)
    history_end, lengths = history_bounds(users, max_length)
    samples = [i for i in range(len(users)) if lengths[i] > 0]
    random.Random(seed).shuffle(samples)
    samples = torch.tensor(samples[:20])

    packed = pack_batch(items, times, history_end[samples], lengths[samples], targets=items[samples])
    expected = reference_collate(users, items, times, samples.tolist(), max_length)

    assert packed.items.tolist() == expected[0]
    assert packed.timestamps.tolist() == expected[1]
    assert packed.seq_idx.tolist() == expected[2]
    assert packed.seq_idx.dtype == torch.int32
    assert packed.reverse_index.tolist() == expected[3]
    assert packed.last_index.tolist() == expected[4]
    assert packed.targets.tolist() == expected[5]
    assert packed.cu_seqlens[-1] == len(expected[0])


def test_history_bounds_restart_at_each_user():
    users = torch.tensor([4, 4, 4, 7, 9, 9])
    history_end, lengths = history_bounds(users)
    assert history_end.tolist() == [0, 1, 2, 3, 4, 5]
    assert lengths.tolist() == [0, 1, 2, 0, 0, 1]
    assert history_bounds(users, max_length=1)[1].tolist() == [0, 1, 1, 0, 0, 1]


def test_reverse_index_reverses_each_sequence_in_place():
    cu_seqlens = torch.tensor([0, 3, 4, 8])
    seq_idx, position, reverse_index = segment_layout(cu_seqlens)
    assert reverse_index.tolist() == [2, 1, 0, 3, 7, 6, 5, 4]
    assert position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert torch.equal(reverse_index[reverse_index], torch.arange(8))
    assert torch.equal(seq_idx[reverse_index], seq_idx)


def test_masking_replaces_tokens_with_mask_token_only():
    users, items, times = random_store(num_users=40, max_len=30, seed=3)
    history_end, lengths = history_bounds(users)
    samples = torch.nonzero(lengths > 0).squeeze(1)
    clean = pack_batch(items, times, history_end[samples], lengths[samples])
    generator = torch.Generator().manual_seed(0)
    masked = pack_batch(
        items, times, history_end[samples], lengths[samples], mask_ratio=0.3, mask_token=0, generator=generator
    )
    changed = masked.items != clean.items
    assert torch.all(masked.items[changed] == 0)
    assert 0.25 < changed.float().mean() < 0.35
    # Masking touches item ids only, never the layout.
    assert torch.equal(masked.seq_idx, clean.seq_idx)
    assert torch.equal(masked.timestamps, clean.timestamps)
