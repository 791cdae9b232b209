"""The SSD scan's output at one position per packed sequence, without scanning the rest.

The scan (``ssd4rec.ops.ssd_scan``) gives every token's output. SSD4Rec's last layer needs it
at one token per sequence only, the one it scores (both directions read there, BiSSDLayer).
Unrolled, the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t
gives the output at a query position q of a sequence that starts at a as

    y_q[h, :] = sum_{s=a}^{q} (C_q . B_s) exp(cum_q[h] - cum_s[h]) dt_s[h] x_s[h, :] + D[h] x_q[h, :]

with cum the running sum of dt A: one attention row, the query's against its own sequence,
O(L (N + P)) per sequence and head where the scan is O(L P N). The cumulative sums are taken in
float64: a difference of two running sums over the whole stream keeps float32's precision there
(as the chunked scan's per-chunk sums do), where in float32 it would lose the digits the two
share. Everything else is float32 (float64 for float64 input), and the per-sequence sums
are ``segment_sum``'s, which add in a fixed order on the GPU.

On the ML-1M training step the full scan of the last layer (forward and backward, both
directions) took about 5.7 ms on an H100; with this, the step's GPU time fell by 2.9 ms and
the step from 24.4 to 22.2 ms (results/MEASUREMENTS.md, session 18).

Shapes: xBC: (R, T, d_inner + 2 g N) after the conv, x | B | C as in ``ssd_scan_xbc``; dt:
(R, T, H) before bias and softplus; A, dt_bias: (H,); D: (H,) or (H, P); seq_idx: (T,) int,
the same for every row, sequence ids 0..K-1 in order; cu_seqlens: (K+1,); query_index:
(R, K) int64, query k a token of sequence k. Returns (R, K, d_inner) in xBC's dtype.
"""

import torch

from ssd4rec.modules import compiled_glue
from ssd4rec.ops.segment_sum import segment_broadcast, weighted_segment_sum
from ssd4rec.ops.ssd_scan import _process_dt


def decays(dt, A, dt_bias, dt_softplus, dt_limit, compute):
    """dt: (R, T, H) raw -> dt as the scan uses it (``ssd_scan._process_dt``: bias, softplus,
    dt_limit), (R, T, H) in ``compute``, and dA = dt A laid
    out (R, H, T) in float64, contiguous: what running_sum scans."""
    dt = _process_dt(dt.to(compute), None if dt_bias is None else dt_bias.to(compute), dt_softplus, dt_limit)
    return dt, (dt.double() * A.double()).transpose(1, 2).contiguous()


def running_sum(dA):
    """dA: (R, H, T) float64, contiguous -> its cumulative sum over T, as (R, T, H), one 1-D scan.

    Only differences within a sequence are used, so the sum may run on across rows and heads:
    flattened, it is one long 1-D cumsum, which CUDA scans in parallel, where torch.cumsum over
    T of an (R, T, H) tensor runs R * H sequential scans of length T (46 ms at the ML-1M step's
    shape on an H100). float64 keeps the differences exact to about 1e-16 of the total.
    """
    R, H, T = dA.shape
    return dA.view(-1).cumsum(0).view(R, H, T).transpose(1, 2)


def query_weights(dt, cum, cum_q, B, C_q, after_query, ngroups):
    """Each token's weight in its query's output: (C_q . B_s) exp(cum_q - cum_s) dt_s, 0 after the
    query. dt: (R, T, H); cum, cum_q: (R, T, H) float64; B, C_q: (R, T, g N); after_query: (R, T)
    bool -> (R, T, H) in dt's dtype."""
    after = after_query[..., None]
    # masked before exp: after the query the exponent is positive and could overflow
    log_decay = torch.where(after, 0.0, (cum_q - cum).to(dt.dtype))
    score = (C_q.unflatten(-1, (ngroups, -1)) * B.to(dt.dtype).unflatten(-1, (ngroups, -1))).sum(-1)
    score = score.repeat_interleave(dt.shape[-1] // ngroups, dim=-1)  # head h reads group h // (H / g)
    return torch.where(after, 0.0, torch.exp(log_decay) * dt * score)


def _run(fn, compiled, *args):
    """fn(*args), through torch.compile when compiled (dim 1, tokens, dynamic: no recompile per
    batch); the glue's backend, ``compiled_glue.COMPILE_BACKEND``."""
    if not compiled:
        return fn(*args)
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(arg, 1)
    return compiled_glue.compiled(fn)(*args)


def ssd_scan_at(xBC, dt, A, headdim, query_index, seq_idx, cu_seqlens, ngroups=1, D=None, dt_bias=None,
                dt_softplus=False, dt_limit=(0.0, float("inf")), compiled=False):
    """ssd_scan_xbc(xBC, dt, A, ...)[r, query_index[r, k]] for every row r and sequence k.

    compiled: the elementwise parts, forward and backward, through torch.compile: a few kernels
    where eager runs some eighty, whose launches bound the ML-1M step on an H100. The
    per-sequence sums and the broadcasts back stay ``segment_sum``'s (their gradients would
    be atomic scatter-adds in compiled code). Shapes in the module docstring.
    """
    R, T, conv_dim = xBC.shape
    nheads = dt.shape[-1]
    d_inner = nheads * headdim
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    x, B, C = torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    rows = torch.arange(R, device=xBC.device)[:, None]
    compute = torch.promote_types(xBC.dtype, torch.float32)  # float64 stays float64 (the tests)
    seq_idx = seq_idx.long()  # once: every gather below indexes with it

    dt, dA = _run(decays, compiled, dt, A, dt_bias, dt_softplus, tuple(dt_limit), compute)
    cum = running_sum(dA)  # (R, T, H) float64
    query_of_token = query_index[:, seq_idx]  # (R, T): the position each token answers to
    after_query = torch.arange(T, device=xBC.device) > query_of_token  # those add nothing
    cum_q = segment_broadcast(cum[rows, query_index], cu_seqlens, seq_idx)  # (R, T, H)
    C_q = segment_broadcast(C[rows, query_index].to(compute), cu_seqlens, seq_idx)  # (R, T, g N)
    weight = _run(query_weights, compiled, dt, cum, cum_q, B, C_q, after_query, ngroups)

    y = weighted_segment_sum(x.unflatten(-1, (nheads, headdim)), weight, cu_seqlens, seq_idx,
                             compiled)  # (R, K, H, P) float32 (float64)
    if D is not None:
        x_q = x[rows, query_index].unflatten(-1, (nheads, headdim)).to(compute)
        y = y + (D.to(compute)[:, None] if D.dim() == 1 else D.to(compute)) * x_q  # D: (H,) or (H, P)
    return y.flatten(-2).to(xBC.dtype)


__all__ = ["decays", "query_weights", "running_sum", "ssd_scan_at"]
