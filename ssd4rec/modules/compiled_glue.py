"""The ssd backbone's elementwise glue through ``torch.compile`` (LifelongRec's ``compile_glue``).

Why. At Rec-Mamba's setting (hidden 50, d_inner 100, 512,000 packed tokens per batch) a
profile of one H100 training step (~65 ms, issue #7) puts mamba_ssm's Triton SSD scan at
~25 ms; most of the rest are bandwidth-bound elementwise passes over (T, 50) and (T, 100)
tensors, each a kernel of its own in eager mode: dropout, residual adds, LayerNorms, the FFN's
GELU, the gated RMSNorm. Compiled (inductor), the passes between two matmuls fuse into one
kernel, forward and backward.

What is compiled. Two pure functions of tensors, the same code for every layer (so one
compilation serves all of them):

  input_norm:  LN(Dropout(e))                                             once per window
  layer_tail:  h = LN(x + Dropout(out_proj(GatedRMSNorm(y, z))))            once per layer
               LN(h + Dropout(W2 Dropout(GELU(W1 h))))

with y, z the mixer's scan output and gate (``StatefulMamba2Mixer.scan_segments``). The
scan (``ssd4rec.ops.ssd_scan``: mamba_ssm's Triton kernel, or our chunked PyTorch scan with
its custom autograd Functions) and the causal convolution (``ssd4rec.ops.causal_conv1d``)
stay eager, between the regions; so does the carried state's arithmetic. The regions do not
depend on the state, so windows that carry one (histories longer than the window) run the
same compiled code.

Not compiled: in_proj and the split / channel padding before the convolution. The only
elementwise pass there is the copy that pads xBC's channels (``StatefulMamba2Mixer._conv``),
and it sits between a matmul and the external conv kernel, with nothing to fuse it with;
in backward the split's gradient is one concatenation either way.

Plain maths inside. ``F.layer_norm`` and the gated RMSNorm written out: the custom autograd
Functions of the eager path (``ssd4rec.modules.layer_norm``'s manual CUDA LayerNorm,
``stateful._GatedRMSNormFn``) work around slow eager kernels and save memory by recomputing;
inductor generates its own kernels and its partitioner recomputes cheap elementwise results
in backward on its own. The functions read the modules' own parameters, so parameter names
and state_dicts are the same with ``compile_glue`` on or off.

Shapes. The packed token count T changes from batch to batch; dim 0 of the (T, .) inputs
is marked dynamic (``torch._dynamo.maybe_mark_dynamic``) so that it does not recompile per
batch. Each region compiles once per grad mode (training; the no-grad forward of
checkpointed windows and of evaluation), dropout on or off, dtype, and T = 1 (dynamo
specialises sizes 0 and 1). Compile time, measured on a 2-core CPU at the tests' sizes, cold
cache: about 10 s for the training step's graphs, 3 s more for evaluation's (inductor's
on-disk cache makes later processes faster); on the H100 the benchmark's 4 untimed warm-up
steps absorb it (its step time there: 49.6 ms against 67.2 ms eager, results/MEASUREMENTS.md).
Past dynamo's recompile limit (8 variants per function) a region runs eagerly, with a warning.

Dropout in compiled code draws other random numbers than eager (same distribution); with
dropout off (or in eval) the results equal eager up to rounding. The reentrant checkpoint of
the window loop restores the RNG state before recomputing a window, so the compiled no-grad
forward and the recompute must draw the same masks: tests/test_compiled_glue.py checks the
plumbing (aot_eager), tests/test_lifelong_gpu.py inductor's CUDA random numbers.

``COMPILE_BACKEND``: torch.compile's backend, "inductor"; the CPU tests set "aot_eager"
(which traces the same graphs without generating kernels, so it compiles in a second).
"""

import functools

import torch
import torch.nn.functional as F

from ssd4rec.errors import SSD4RecError

COMPILE_BACKEND = "inductor"  # a torch.compile backend name or callable; read at each call


def resolve_compile_glue(value, device):
    """A config's compile_glue (true, false or auto) as a bool; auto: on for a CUDA device.
    Shared by the models that offer the option (LifelongRec, SSD4Rec)."""
    if value == "auto":
        return device is not None and torch.device(device).type == "cuda"
    if not isinstance(value, bool):
        raise SSD4RecError(f"config key 'compile_glue': expected true, false or auto, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# The compiled regions: pure functions of tensors and Python numbers
# --------------------------------------------------------------------------------------------
def _dropout(x, p):
    """Dropout with probability p; p = 0 (eval, or no dropout) is the identity, no mask drawn."""
    return F.dropout(x, p, True) if p > 0 else x


def _layer_norm(x, weight, bias, eps):
    """x: (T, d) -> (T, d); weight, bias: (d,)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def gated_rms_norm(y, z, weight, eps, group_size):
    """rmsnorm(y silu(z)) weight, per group of group_size channels (``GatedRMSNorm``'s maths).

    y, z: (T, d_inner); weight: (d_inner,). Computed in float32 (float64 stays float64),
    returned in y's dtype.
    """
    compute = torch.promote_types(y.dtype, torch.float32)
    v = (y.to(compute) * F.silu(z.to(compute))).unflatten(-1, (-1, group_size))  # (T, groups, g)
    v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
    return (v.flatten(-2) * weight.to(compute)).to(y.dtype)


def input_norm(e, ln, p):
    """LN(Dropout(e)): the ssd backbone's input. e: (T, d) -> (T, d).

    ln: (weight, bias, eps) of the LayerNorm; p: dropout probability (0 when off).
    """
    return _layer_norm(_dropout(e, p), *ln)


def layer_tail(x, y, z, norm, out_proj, ln, w_1, w_2, ffn_ln, p_mix, p_ffn):
    """One residual mixer layer after its scan: LN(x + Dropout(out_proj(GatedRMSNorm(y, z)))),
    then the FFN LN(h + Dropout(W2 Dropout(GELU(W1 h)))).

    x: (T, d_model) the layer's input; y, z: (T, d_inner) scan output and gate.
    norm: (weight, eps, group_size) of the gated RMSNorm; out_proj, w_1, w_2: (weight, bias)
    of Linears (bias may be None); ln, ffn_ln: (weight, bias, eps) of LayerNorms; p_mix, p_ffn:
    dropout probabilities (0 when off). Returns (T, d_model).
    """
    h = F.linear(gated_rms_norm(y, z, *norm), *out_proj)
    h = _layer_norm(x + _dropout(h, p_mix), *ln)
    f = _dropout(F.gelu(F.linear(h, *w_1)), p_ffn)
    return _layer_norm(h + _dropout(F.linear(f, *w_2), p_ffn), *ffn_ln)


# --------------------------------------------------------------------------------------------
# Calling them with a backbone's modules (eager)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _compile(fn, backend):
    # dynamic=None: static shapes except the dims marked dynamic (the token dim), so that the
    # model's widths (50, 100) stay constants in the generated kernels.
    return torch.compile(fn, backend=backend, dynamic=None)


def compiled(fn):
    """``fn`` through torch.compile with COMPILE_BACKEND (one wrapper per function and backend)."""
    return _compile(fn, COMPILE_BACKEND)


def _mark_tokens(*tensors):
    """Dim 0 (tokens) dynamic, unless dynamo specialises it (T = 1): no recompile per batch."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def _p(dropout):
    """The probability an ``nn.Dropout`` applies now: 0 in eval mode."""
    return float(dropout.p) if dropout.training else 0.0


def _linear(module):
    return module.weight, module.bias


def _ln(module):
    return module.weight, module.bias, float(module.eps)


def embed_norm(stack, e):
    """stack: an ``SSDBackbone`` (its dropout and LayerNorm); e: (T, d) -> LN(Dropout(e)) (T, d)."""
    _mark_tokens(e)
    return compiled(input_norm)(e, _ln(stack.LayerNorm), _p(stack.dropout))


def residual_tail(layer, x, y, z):
    """layer: a ``_ResidualMixerLayer`` around a ``StatefulMamba2Mixer``; x: (T, d_model) its
    input; y, z: (T, d_inner) from ``mixer.scan_segments``. Returns the layer's output (T, d_model),
    what ``layer(x, mixer.out_proj(mixer.norm(y, z)))`` computes in eager mode."""
    mixer, ffn = layer.mixer, layer.ffn
    norm = (mixer.norm.weight, float(mixer.norm.eps), mixer.norm.group_size)
    _mark_tokens(x, y, z)
    return compiled(layer_tail)(x, y, z, norm, _linear(mixer.out_proj), _ln(layer.LayerNorm),
                                _linear(ffn.w_1), _linear(ffn.w_2), _ln(ffn.LayerNorm),
                                _p(layer.dropout), _p(ffn.dropout))


__all__ = ["COMPILE_BACKEND", "compiled", "embed_norm", "gated_rms_norm", "input_norm", "layer_tail",
           "residual_tail"]
