"""Per-sequence sums over a packed stream, and the broadcast back to the tokens: each is the
other's gradient, so both are autograd Functions whose backward calls the other.

    weighted_segment_sum:  out[r, k, h, p] = sum_{t in seq k} w[r, t, h] v[r, t, h, p]
    segment_broadcast:     out[r, t, f]    = v[r, seq_idx[t], f]

Shapes: v (R, T, H, P) for the sum (w (R, T, H) or None), (R, K, F) for the broadcast;
seq_idx: (T,) int, token t in sequence seq_idx[t]; cu_seqlens: (K+1,) int, sequence k being
tokens cu_seqlens[k]:cu_seqlens[k+1] (the same layout, given both ways: the sum reads runs of
tokens, its gradient gathers by token). Sums accumulate and return float32 (float64 for
float64 input).

On CUDA with triton the sum is ``segment_sum_triton``'s kernel, which adds each sequence in a
fixed order; elsewhere ``index_add_`` (on a CPU, in index order; on CUDA without triton, with
atomics, so its last bits may change from run to run).
"""

import torch

from ssd4rec.modules import compiled_glue

try:
    from ssd4rec.ops.segment_sum_triton import segment_sum_triton
except ImportError:  # no triton (the CPU install): index_add_ below
    segment_sum_triton = None


def _accumulator(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sum(v, w, cu_seqlens, seq_idx):
    """v: (R, T, F); w: (R, T, H) or None, H dividing F -> (R, K, F) in float32 (float64)."""
    if v.is_cuda and segment_sum_triton is not None:
        return segment_sum_triton(v, w, cu_seqlens)
    R, T, F = v.shape
    acc = _accumulator(v.dtype)
    terms = v.to(acc)
    if w is not None:
        terms = (terms.unflatten(-1, (w.shape[-1], -1)) * w.to(acc)[..., None]).flatten(-2)
    out = torch.zeros(R, cu_seqlens.shape[0] - 1, F, device=v.device, dtype=acc)
    return out.index_add_(1, seq_idx.long(), terms)


def weighted_sum_grads(v, w, grad, seq_idx):
    """The gradients of weighted_segment_sum: v: (R, T, H, P), w: (R, T, H) or None, grad:
    (R, K, H, P) -> dv in v's dtype, dw in w's (None without w)."""
    per_token = grad[:, seq_idx.long()]  # (R, T, H, P)
    if w is None:
        return per_token.to(v.dtype), None
    dv = (per_token * w[..., None].to(per_token.dtype)).to(v.dtype)
    dw = (per_token * v.to(per_token.dtype)).sum(-1).to(w.dtype)
    return dv, dw


class _WeightedSegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, w, cu_seqlens, seq_idx, compile_backward):
        ctx.save_for_backward(v, w, seq_idx)
        ctx.compile_backward = compile_backward
        return segment_sum(v.flatten(-2), w, cu_seqlens, seq_idx).unflatten(-1, v.shape[-2:])

    @staticmethod
    def backward(ctx, grad):
        v, w, seq_idx = ctx.saved_tensors
        fn = weighted_sum_grads
        if ctx.compile_backward:
            for t in (v, w, grad):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 1)  # tokens (v, w) or sequences (grad)
            torch._dynamo.maybe_mark_dynamic(seq_idx, 0)
            fn = compiled_glue.compiled(weighted_sum_grads)
        dv, dw = fn(v, w, grad.contiguous(), seq_idx)
        return dv, (dw if ctx.needs_input_grad[1] else None), None, None, None


def weighted_segment_sum(v, w, cu_seqlens, seq_idx, compile_backward=False):
    """v: (R, T, H, P), w: (R, T, H) or None -> (R, K, H, P) float32 (float64 for float64 v).

    compile_backward: the backward's gather and products through torch.compile (one pass over
    v instead of four; the glue's backend, ``compiled_glue.COMPILE_BACKEND``)."""
    return _WeightedSegmentSum.apply(v, w, cu_seqlens, seq_idx, compile_backward)


class _SegmentBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, cu_seqlens, seq_idx):
        ctx.save_for_backward(cu_seqlens, seq_idx)
        ctx.dtype = v.dtype
        return v[:, seq_idx.long()]

    @staticmethod
    def backward(ctx, grad):
        cu_seqlens, seq_idx = ctx.saved_tensors
        return segment_sum(grad, None, cu_seqlens, seq_idx).to(ctx.dtype), None, None


def segment_broadcast(v, cu_seqlens, seq_idx):
    """v: (R, K, F) -> (R, T, F), each token the row of its sequence; the gradient sums each
    sequence's tokens in a fixed order (autograd's own would scatter-add)."""
    return _SegmentBroadcast.apply(v, cu_seqlens, seq_idx)


__all__ = ["segment_broadcast", "segment_sum", "weighted_segment_sum"]
