"""Time gaps between consecutive interactions, for time-aware models (TiM4Rec).

Three steps, each a tensor operation with no Python loop over items or sequences:

1. :func:`time_gaps`: ``gap_i = t_i - t_{i-1}`` inside a sequence, 0 for the first item of
   every sequence. On a packed stream the sequence id of each token (``seq_idx``) says where a
   sequence starts; on padded rows each row is one sequence. Computed in the timestamps' own
   dtype: the dataset keeps exact float64 unix seconds (float32, RecBole's float type, rounds
   times around 1.4e9 s to 128 s, which erases every gap under two minutes).
2. :func:`scale_gaps`: the value the model sees, ``log1p(gap / unit)`` (or the raw gap).
3. :func:`segment_normalize`: per-sequence standardisation from segment statistics, the
   length-agnostic counterpart of a LayerNorm over the position axis.

Why ``log1p(gap / unit)`` with ``unit`` = one hour (``DEFAULT_TIME_UNIT``)
-------------------------------------------------------------------------------
Real gaps span ten orders of magnitude: 0 (equal timestamps: MovieLens users rate dozens of
films within the same second, Amazon reviews of the same day), seconds to minutes (a rating
session), days, and years (ML-1M spans 2000-2003, Amazon 1996-2014: gaps up to ~5e8 s).

- Raw seconds (the official TiM4Rec code) make a single long gap dominate any statistic of
  the sequence: after a LayerNorm over positions every other gap is squeezed to almost the
  same value, and squaring 1e8 overflows half precision. ``log1p`` keeps every gap finite and
  ordered, maps [0 s, 30 years] into [0, ~12.5], and 0 to exactly 0.
- ``log1p(g / u)`` is ~linear below the unit and logarithmic above it, so the unit is a soft
  resolution: one hour collapses a rating session (seconds to minutes: 0 to ~0.1) and spreads
  what distinguishes behaviour in every dataset (same session ~0, next day 3.2, next week 5.1,
  next month 6.6, next year 9.1, ten years 11.4).
- The unit is in physical seconds, not a per-dataset statistic, so a gap of one day means the
  same value on MovieLens (second resolution) and Amazon (day resolution: gaps are multiples
  of 86,400 s, i.e. exactly 0, log(25), log(49), ...). A learned function of the gap then
  transfers across datasets, and nothing depends on which users happen to be in a batch.
- Timestamps are sorted per user, so gaps are never negative; ``log1p`` clamps negative
  gaps to 0 anyway (never NaN), e.g. the official code's padding artifact (see
  :mod:`ssd4rec.models.tim4rec`), which only ``raw`` scaling keeps.
"""

import torch

__all__ = ["DEFAULT_TIME_UNIT", "SCALINGS", "time_gaps", "scale_gaps", "segment_normalize"]

DEFAULT_TIME_UNIT = 3600.0  # seconds
SCALINGS = ("log1p", "raw")


def time_gaps(timestamps, seq_idx=None):
    """Gaps to the previous interaction of the same sequence; 0 where a sequence starts.

    timestamps: (..., T) times along the last axis, in order within each sequence.
    seq_idx:    (..., T) int sequence id of each position (non-decreasing along the axis), or
                None: the whole last axis is one sequence (padded rows).
    Returns (..., T) in the timestamps' dtype (keep float64 for unix seconds).
    """
    if timestamps.shape[-1] == 0:
        return timestamps.clone()
    step = timestamps[..., 1:] - timestamps[..., :-1]
    if seq_idx is not None:
        if seq_idx.shape != timestamps.shape:
            raise ValueError(f"seq_idx {tuple(seq_idx.shape)} must match timestamps {tuple(timestamps.shape)}")
        same = seq_idx[..., 1:] == seq_idx[..., :-1]
        step = torch.where(same, step, torch.zeros_like(step))
    first = torch.zeros_like(timestamps[..., :1])
    return torch.cat([first, step], dim=-1)


def scale_gaps(gaps, scaling="log1p", unit=DEFAULT_TIME_UNIT):
    """The model's time input from gaps in seconds (see the module docstring).

    scaling: "log1p": log1p(max(gap, 0) / unit); "raw": the gaps unchanged.
    Computes in the gaps' dtype; cast the result to the model's dtype afterwards.
    """
    if scaling == "raw":
        return gaps
    if scaling == "log1p":
        if not unit > 0:
            raise ValueError(f"time unit must be positive, got {unit!r}")
        return torch.log1p(gaps.clamp(min=0) / unit)
    raise ValueError(f"time scaling must be one of {SCALINGS}, got {scaling!r}")


def segment_normalize(x, seq_idx=None, num_segments=None, eps=1e-5):
    """Standardise every channel over the positions of each sequence.

    x:            (b, l, c)
    seq_idx:      (b, l) int, non-negative sequence id per position (packed rows), or None:
                  each row is one sequence (then this is a LayerNorm over the l axis, per channel).
    num_segments: an upper bound on seq_idx + 1 (e.g. the batch's number of sequences), given
                  to spare a device-to-host sync; computed when None.
    Returns (x - mean) / sqrt(var + eps) with the (biased) mean and variance of x over the
    positions of the same row and sequence: (b, l, c), x's dtype, float32 or wider inside.

    Two passes (mean, then centred squares), so values far from 0 lose no precision; a
    sequence of equal values gives exactly 0.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (b, l, c), got {tuple(x.shape)}")
    dtype = x.dtype
    xc = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if seq_idx is None:
        centred = xc - xc.mean(dim=1, keepdim=True)
        var = centred.pow(2).mean(dim=1, keepdim=True)
        return (centred * torch.rsqrt(var + eps)).to(dtype)

    b, l, c = xc.shape
    if seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be (b, l) = {(b, l)}, got {tuple(seq_idx.shape)}")
    seq_idx = seq_idx.long()
    if num_segments is None:
        num_segments = int(seq_idx.max()) + 1 if seq_idx.numel() else 1
    rows = torch.arange(b, device=x.device)[:, None] * num_segments
    key = (seq_idx + rows).reshape(-1)  # (b*l,) one id per (row, sequence)
    flat = xc.reshape(b * l, c)
    n = b * num_segments
    count = torch.zeros(n, dtype=xc.dtype, device=x.device).index_add(
        0, key, torch.ones(b * l, dtype=xc.dtype, device=x.device)
    ).clamp(min=1)[:, None]
    mean = torch.zeros(n, c, dtype=xc.dtype, device=x.device).index_add(0, key, flat) / count
    centred = flat - mean[key]
    var = torch.zeros(n, c, dtype=xc.dtype, device=x.device).index_add(0, key, centred.pow(2)) / count
    out = centred * torch.rsqrt(var[key] + eps)
    return out.reshape(b, l, c).to(dtype)
