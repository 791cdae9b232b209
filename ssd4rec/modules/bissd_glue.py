"""The Bi-SSD layer's elementwise glue through ``torch.compile`` (SSD4Rec's ``compile_glue``).

Why. On the ML-1M training step (bf16, H100, issue #4) about 28 ms of 58 ms are outside
the Triton scan: LayerNorms, dropout, residual adds, GELU, the gated RMSNorm, the
fwd + beta * bwd combine, the stack and reversal of the two directions, each an eager
kernel of its own over (T, d) tensors. Compiled, the passes between two matmuls fuse.

The design is LifelongRec's (``ssd4rec.modules.compiled_glue``, whose docstring says more):
pure functions of tensors and Python numbers that read the modules' own parameters (so
state_dicts are the same with the option on or off), the packed token dim marked dynamic
(no recompile per batch), the backend read from ``compiled_glue.COMPILE_BACKEND`` at each
call (the CPU tests set "aot_eager").

What is compiled, per layer with shared directions (``BiSSDLayer.mix``'s maths):

  both_directions:  stack(in_proj(x), reverse(in_proj(x))), split        z, xBC, dt: (2, T, .)
  shared_tail:      g = GatedRMSNorm(y, z)                                (2, T, d_inner)
                    m = out_proj((g[0] + beta * bwd(g[1]))[keep])  (+ (1 + beta) * bias)
                    h = Dropout(LN(m + x[keep]))
                    out = Dropout(LN(h + W2 Dropout(GELU(W1 h))))

with bwd the reversal when align_backward, else the identity. When the last layer's scan ran
for the kept rows only (``BiSSDLayer.scan_scored_only``), ``scored_rows_tail`` takes the place
of shared_tail: the same, on (2, K, d_inner) inputs. Between the two regions,
eager: the causal convolution (``ssd4rec.ops.causal_conv1d``) and the scan
(``ssd4rec.ops.ssd_scan``: mamba_ssm's Triton kernels, ours, or our PyTorch scan).

Unshared directions (two mixers): each mixer runs eagerly as a whole (``Mamba2Mixer.forward``,
gated norm and out_proj included) and only what follows the combine is compiled,
``residual_ffn``: h and out above. Fusing each mixer's gated norm and out_proj as well would
need a second set of regions for a setting the official code does not use.

The item embeddings' LN(Dropout(e)) (``norm_embedding``) is ``compiled_glue.input_norm``;
the embedding lookup before it and the scoring and loss after the encoder stay eager.

Graphs: stack_directions, and shared_tail twice (without keep_index for the first layers,
with it for the last), per grad mode and dropout on or off; the layers share them. Measured
on this CPU (aot_eager, tests/test_bissd_compiled_glue.py): no graph break, no recompile
across batches of other sizes; with inductor on CPU the first step took about 30 s (C++ code
generation on 2 cores), the next 0.25 s. On an H100 (scripts/bench_variants.py, ML-1M, bf16,
batch 1024, history <= 200) it took the training step from 59.2 to 45.6 ms and the peak memory
from 9.2 to 6.1 GiB. The option still defaults to off (config.yaml) until
tests/test_gpu.py's inductor-against-eager test has run on a GPU.

Reversal inside a region is ``bissd.reverse_rows`` (an autograd Function, traced by dynamo):
its backward is the same gather, where plain indexing would give a scatter-add.
"""

import torch
import torch.nn.functional as F

from ssd4rec.modules import bissd  # reverse_rows; bissd imports this module, so by attribute at call time
from ssd4rec.modules.compiled_glue import (_dropout, _layer_norm, _linear, _ln, _mark_tokens, _p, compiled,
                                           gated_rms_norm, input_norm)


# --------------------------------------------------------------------------------------------
# The compiled regions: pure functions of tensors and Python numbers
# --------------------------------------------------------------------------------------------
def stack_directions(x, reverse_index, in_proj, split_sizes):
    """x: (T, d_model), reverse_index: (T,), in_proj: (weight, bias), split_sizes: the widths of
    z, xBC and dt -> z, xBC, dt: (2, T, width) each, three tensors of their own: the projection
    in reading order and with every sequence reversed (in_proj acts per token, so reversing
    its output is projecting the reversed input).

    Split here rather than after: the backward then reads the three gradients straight into
    its reversal kernel, where split views would make autograd concatenate them first (one
    copy of the (2, T, P) gradient per layer)."""
    projected = F.linear(x, *in_proj)
    both = torch.stack([projected, bissd.reverse_rows(projected, reverse_index)])
    return tuple(part.contiguous() for part in torch.split(both, split_sizes, dim=-1))


def residual_ffn(x, mixed, keep_index, ln, p, w_1, w_2, ffn_ln, p_ffn):
    """What a Bi-SSD layer does after its mixer: h = Dropout(LN(mixed + x[keep])), then the FFN
    Dropout(LN(h + W2 Dropout(GELU(W1 h)))).

    x: (T, d_model) the layer's input; mixed: (K, d_model) the mixer's output at the kept rows,
    keep_index: (K,) or None (K = T, every row). ln, ffn_ln: (weight, bias, eps) of LayerNorms;
    w_1, w_2: (weight, bias) of the FFN's Linears; p, p_ffn: dropout probabilities (0 when off).
    Returns (K, d_model).
    """
    if keep_index is not None:
        x = x[keep_index]
    h = _dropout(_layer_norm(mixed + x, *ln), p)
    f = F.linear(_dropout(F.gelu(F.linear(h, *w_1)), p_ffn), *w_2)
    return _dropout(_layer_norm(f + h, *ffn_ln), p_ffn)


def shared_tail(x, y, z, reverse_index, keep_index, norm, beta, align_backward, out_proj, *ffn_args):
    """A shared-directions Bi-SSD layer after its scan (``BiSSDLayer.mix``, then residual_ffn).

    x: (T, d_model) the layer's input; y, z: (2, T, d_inner) scan output and gate of both
    directions (row 1 reversed); reverse_index: (T,); keep_index: (K,) or None. norm: (weight,
    eps, group_size) of the gated RMSNorm; beta: the backward weight; align_backward: flip the
    backward output back first; out_proj: (weight, bias or None); ffn_args: residual_ffn's
    arguments after keep_index. Returns (K, d_model).
    """
    gated = gated_rms_norm(y, z, *norm)  # (2, T, d_inner)
    bwd = bissd.reverse_rows(gated[1], reverse_index) if align_backward else gated[1]
    combined = gated[0] + beta * bwd  # (T, d_inner)
    if keep_index is not None:
        combined = combined[keep_index]  # out_proj and the rest on the scored rows only
    weight, bias = out_proj
    mixed = F.linear(combined, weight)  # out_proj(a) + beta out_proj(b), one matmul
    if bias is not None:
        mixed = mixed + (1 + beta) * bias
    return residual_ffn(x, mixed, keep_index, *ffn_args)


def scored_rows_tail(x, y, z, keep_index, norm, beta, out_proj, *ffn_args):
    """shared_tail when the scan ran for the kept rows only (``BiSSDLayer.scan_scored_only``).

    x: (T, d_model) the layer's input; y, z: (2, K, d_inner) scan output and gate of both
    directions at the rows each adds to the kept rows keep_index: (K,) (row 1 already at its
    aligned or unaligned position, so no reversal here); the rest as shared_tail. Returns
    (K, d_model).
    """
    gated = gated_rms_norm(y, z, *norm)  # (2, K, d_inner)
    weight, bias = out_proj
    mixed = F.linear(gated[0] + beta * gated[1], weight)
    if bias is not None:
        mixed = mixed + (1 + beta) * bias
    return residual_ffn(x, mixed, keep_index, *ffn_args)


# --------------------------------------------------------------------------------------------
# Calling them with a BiSSDLayer's modules (eager)
# --------------------------------------------------------------------------------------------
def _ffn_args(layer):
    """residual_ffn's arguments after keep_index, from a ``BiSSDLayer``."""
    ffn = layer.ffn
    return (_ln(layer.layer_norm), _p(layer.dropout), _linear(ffn.w_1), _linear(ffn.w_2), _ln(ffn.layer_norm),
            _p(ffn.dropout))


def _mark_rows(*tensors):
    """Dim 0 dynamic (tokens, or kept rows); None entries skipped."""
    _mark_tokens(*(t for t in tensors if t is not None))


def both_directions(layer, x, reverse_index):
    """layer: a shared-directions ``BiSSDLayer``; x: (T, d_model) -> in_proj of both reading
    orders, split: z, xBC, dt: (2, T, width) each."""
    _mark_rows(x, reverse_index)
    mixer = layer.forward_ssd
    return compiled(stack_directions)(x, reverse_index, _linear(mixer.in_proj), mixer.projection_widths())


def layer_tail(layer, x, y, z, reverse_index, keep_index):
    """layer: a shared-directions ``BiSSDLayer``; x: (T, d_model); y, z: (2, T, d_inner) from
    the scan of ``both_directions``'s output -> the layer's output, (T or K, d_model)."""
    mixer = layer.forward_ssd
    norm = (mixer.norm.weight, float(mixer.norm.eps), mixer.norm.group_size)
    _mark_rows(x, reverse_index, keep_index)
    for t in (y, z):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # (2, T, d_inner): tokens are dim 1
    return compiled(shared_tail)(x, y, z, reverse_index, keep_index, norm, float(layer.beta),
                                 bool(layer.align_backward), _linear(mixer.out_proj), *_ffn_args(layer))


def scored_tail(layer, x, y, z, keep_index):
    """layer: a shared-directions ``BiSSDLayer``; x: (T, d_model); y, z: (2, K, d_inner) its scan
    at the kept rows (``BiSSDLayer._scan_both_at``) -> the layer's output at them, (K, d_model)."""
    mixer = layer.forward_ssd
    norm = (mixer.norm.weight, float(mixer.norm.eps), mixer.norm.group_size)
    _mark_rows(x, keep_index)
    for t in (y, z):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # (2, K, d_inner): sequences are dim 1
    return compiled(scored_rows_tail)(x, y, z, keep_index, norm, float(layer.beta), _linear(mixer.out_proj),
                                      *_ffn_args(layer))


def after_mix(layer, x, mixed, keep_index):
    """layer: a ``BiSSDLayer``; x: (T, d_model); mixed: (K, d_model) its ``mix`` output ->
    the layer's output, (K, d_model)."""
    _mark_rows(x, mixed, keep_index)
    return compiled(residual_ffn)(x, mixed, keep_index, *_ffn_args(layer))


def embed_norm(e, layer_norm, dropout):
    """LN(Dropout(e)) of the item embeddings, e: (T, d) -> (T, d); layer_norm, dropout: modules."""
    _mark_rows(e)
    return compiled(input_norm)(e, _ln(layer_norm), _p(dropout))


__all__ = ["after_mix", "both_directions", "embed_norm", "layer_tail", "residual_ffn", "scored_rows_tail",
           "scored_tail", "shared_tail", "stack_directions"]
