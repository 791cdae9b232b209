"""Sequence-register packing: variable-length histories as one stream, no padding.

Every user's history is stored once, CSR-style: the interactions of the whole
dataset sorted by (user, time) form ``history_item`` and ``history_time`` (N,),
and user u's interactions are a contiguous run of them. A sample is a pair
(history_end, length): its history is ``history_item[history_end - length :
history_end]`` and its target is ``history_item[history_end]``. Prefixes are never
copied, so memory is O(#interactions) whatever the number of samples.

``pack_batch`` turns B samples into a packed batch of T = sum(lengths) tokens with
tensor operations only (no Python loop over items or samples), on whatever device
its inputs live.
"""

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """B sequences laid end to end, T tokens in all.

    items:         (T,) item ids; masked tokens hold ``mask_token``
    timestamps:    (T,) timestamp of each token
    seq_idx:       (T,) int32, which of the B sequences a token belongs to
    cu_seqlens:    (B+1,) int64 offsets: sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1]
    reverse_index: (T,) int64, the permutation that reverses every sequence in place
    last_index:    (B,) int64, the position of each sequence's last token
    targets:       (B,) the next item of each sequence, or None
    """

    items: torch.Tensor
    timestamps: torch.Tensor
    seq_idx: torch.Tensor
    cu_seqlens: torch.Tensor
    reverse_index: torch.Tensor
    last_index: torch.Tensor
    targets: torch.Tensor = None


# A training batch whose history lengths were summed on the host before it was copied to
# the device carries that sum, T, as this attribute (ssd4rec.trainer.prefetch sets it), so
# that packing it needs no device-to-host read of T.
HOST_TOTAL_TOKENS = "host_total_tokens"


# A batch field of per-row loss weights (float, (B,)): rows of weight 0 pad a batch to a fixed
# token count (ssd4rec.graph_step) and take no part in its loss or gradients.
ROW_WEIGHT_FIELD = "row_weight"


def host_total_tokens(interaction):
    """T of an interaction batch as summed on the host, or None when it was not."""
    return getattr(interaction, HOST_TOTAL_TOKENS, None)


def cu_seqlens_from_lengths(lengths):
    """lengths: (B,) -> cu_seqlens: (B+1,) int64, starting at 0."""
    return torch.nn.functional.pad(lengths.long().cumsum(0), (1, 0))


def segment_layout(cu_seqlens, total_tokens=None):
    """Per-token layout of a packed stream.

    cu_seqlens: (B+1,) offsets; total_tokens: T, given to spare a device-to-host sync.
    Returns seq_idx (T,) int32, position within its sequence (T,) int64, and the
    reversal permutation (T,) int64 with reverse_index[t] = start + end - 1 - t.
    """
    cu_seqlens = cu_seqlens.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if total_tokens is None:
        total_tokens = int(cu_seqlens[-1])
    seq_ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    seq_idx = torch.repeat_interleave(seq_ids, lengths, output_size=total_tokens)
    starts = cu_seqlens[:-1][seq_idx]
    position = torch.arange(total_tokens, device=cu_seqlens.device) - starts
    reverse_index = starts + lengths[seq_idx] - 1 - position
    return seq_idx.to(torch.int32), position, reverse_index


def pack_batch(
    history_item,
    history_time,
    history_end,
    lengths,
    targets=None,
    mask_ratio=0.0,
    mask_token=0,
    generator=None,
    total_tokens=None,
):
    """Gather B histories from the CSR store into one packed stream.

    history_item: (N,) item ids of all interactions, sorted by (user, time)
    history_time: (N,) their timestamps
    history_end:  (B,) index in the store of each sample's target
    lengths:      (B,) history length of each sample, >= 1
    targets:      (B,) next items, passed through
    mask_ratio:   each token is replaced by ``mask_token`` with this probability
                  (the paper's training-time item masking; the last token too)
    Returns a :class:`PackedBatch`.
    """
    lengths = lengths.long()
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    seq_idx, position, reverse_index = segment_layout(cu_seqlens, total_tokens)
    first = history_end.long() - lengths
    source = first[seq_idx.long()] + position
    items = history_item[source]
    if mask_ratio > 0:
        keep = torch.rand(items.shape, generator=generator, device=items.device) >= mask_ratio
        items = torch.where(keep, items, torch.full_like(items, mask_token))
    return PackedBatch(
        items=items,
        timestamps=history_time[source],
        seq_idx=seq_idx,
        cu_seqlens=cu_seqlens,
        reverse_index=reverse_index,
        last_index=cu_seqlens[1:] - 1,
        targets=targets,
    )


def history_bounds(user_ids, max_length=None):
    """CSR bounds of every interaction's history.

    user_ids:   (N,) user of each interaction, sorted so each user's run is contiguous
    max_length: keep only the last ``max_length`` items of a history (None: all)
    Returns (history_end, lengths), both (N,) int64: interaction i has the
    history history_end[i] - lengths[i] : history_end[i] (history_end[i] == i).
    An interaction that opens its user's run has length 0.
    """
    n = user_ids.numel()
    index = torch.arange(n, device=user_ids.device)
    opens_run = torch.ones(n, dtype=torch.bool, device=user_ids.device)
    opens_run[1:] = user_ids[1:] != user_ids[:-1]
    run_start = torch.cummax(torch.where(opens_run, index, torch.zeros_like(index)), 0).values
    lengths = index - run_start
    if max_length is not None:
        lengths = lengths.clamp(max=max_length)
    return index, lengths
