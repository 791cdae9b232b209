"""LayerNorm with a plain-PyTorch CUDA path for widths that are not a multiple of 4.

Why it exists. PyTorch's CUDA ``layer_norm`` uses its vectorized kernel only when the
normalized size N is a multiple of 4. At N = 50 (Rec-Mamba's hidden size, LifelongRec) it
falls back to ``RowwiseMomentsCUDAKernel`` (one 512-thread block per row of 50 values) plus
``LayerNormForwardCUDAKernel``, and its backward to the unvectorized
``layer_norm_grad_input_kernel``. Measured on an H100 with torch.profiler
(``scripts/benchmark_lifelong.py --profile ssd:2000``, 512,000-token batches, 3 training steps
of 72 ms): over the 3 steps ``aten::native_layer_norm`` took 41.4 ms (RowwiseMoments 36.8 ms)
and its backward about 8 ms, i.e. about 16 ms of every 72 ms step, on tensors of 512k x 50
floats (100 MB, which one bandwidth-bound pass reads in about 0.1 ms). Written with
``torch.var_mean`` and elementwise ops, the same maths runs on PyTorch's generic reduction and
elementwise kernels, which do not have that problem. (The speed of this path on a GPU is not
measured yet: ``tests/test_gpu.py`` checks its values there, the benchmark's profile will say.)

The maths, x: (..., N), weight, bias: (N,) (or None), statistics per row over the last dim:

    mean = x.mean(-1),  var = ((x - mean)^2).mean(-1)       (biased, as LayerNorm)
    rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd
    y    = xhat * weight + bias

    backward, g = dy * weight:
    dx      = rstd * (g - g.mean(-1) - xhat * (g * xhat).mean(-1))
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy

Only x, mean and rstd are kept for backward, as the native op does (same memory); xhat is
recomputed there. bfloat16 and float16 inputs are computed in float32 and the result returned
in the input dtype. Under CUDA autocast the native op runs in float32 (it is on CUDA
autocast's float32 list); so does this one.

``LayerNorm`` is a drop-in ``nn.LayerNorm`` (same constructor, parameters, state_dict keys
and initialisation). It takes the manual path on CUDA for float32/bfloat16/float16 inputs
whose normalized size is not a multiple of 4, and calls ``F.layer_norm`` everywhere else (on
CPU its results are bit-identical to ``nn.LayerNorm``'s). ``manual=True`` (constructor, or
``layer_norm(..., manual=True)``) forces the manual path on any device and dtype, for tests;
``manual=False`` never takes it; ``FORCE_MANUAL = True`` (module attribute) forces it for
every one left at the default ``manual=None``, e.g. a whole model in a test.
``replace_layer_norms(module)`` swaps the ``nn.LayerNorm`` modules of an existing tree (e.g.
RecBole's ``TransformerEncoder``) for this one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

FORCE_MANUAL = False  # True: every manual=None call takes the manual path (for tests)
LOW_PRECISION = (torch.bfloat16, torch.float16)
MANUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _LayerNormFn(torch.autograd.Function):
    """LayerNorm over the last dim of x (..., N); weight and bias (N,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        compute = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
        xc = x.to(compute)
        var, mean = torch.var_mean(xc, -1, correction=0, keepdim=True)  # (..., 1) each
        rstd = torch.rsqrt(var + eps)  # (..., 1)
        y = (xc - mean).mul_(rstd)  # (..., N) xhat
        if weight is not None:
            y = torch.addcmul(bias.to(compute), y, weight.to(compute)) if bias is not None \
                else y.mul_(weight.to(compute))
        elif bias is not None:
            y = y.add_(bias.to(compute))
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        compute = mean.dtype
        N = x.shape[-1]
        dyc = dy.to(compute)
        xhat = (x.to(compute) - mean).mul_(rstd)  # (..., N)
        dx = dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dyc * xhat).reshape(-1, N).sum(0).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = dyc.reshape(-1, N).sum(0).to(bias.dtype)
        if ctx.needs_input_grad[0]:
            g = dyc * weight.to(compute) if weight is not None else dyc.clone()  # (..., N), ours
            g_mean = g.mean(-1, keepdim=True)  # (..., 1)
            gx_mean = (g * xhat).mean(-1, keepdim=True)  # (..., 1)
            dx = g.sub_(g_mean).sub_(xhat.mul_(gx_mean)).mul_(rstd).to(x.dtype)
        return dx, dweight, dbias, None


def _wants_manual(x, n):
    return x.is_cuda and x.dtype in MANUAL_DTYPES and n % 4 != 0


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, manual=None):
    """``F.layer_norm``, or the manual path (module docstring) for x: (..., *normalized_shape).

    manual: None takes the manual path on CUDA for float32/bf16/fp16 when prod(normalized_shape)
    is not a multiple of 4 (always if FORCE_MANUAL); True always; False never.
    weight, bias: of shape normalized_shape, or None. Returns y, shaped and typed as x.
    """
    normalized_shape = tuple(normalized_shape)
    n = math.prod(normalized_shape)
    if manual is None:
        manual = FORCE_MANUAL or _wants_manual(x, n)
    if not manual:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {tuple(x.shape)} does not end in {normalized_shape}")
    shape = x.shape
    if k > 1:  # normalize over the flattened trailing dims
        x = x.reshape(*shape[:x.dim() - k], n)
        weight = None if weight is None else weight.reshape(n)
        bias = None if bias is None else bias.reshape(n)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # as the native op there: float32 in and out
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = _LayerNormFn.apply(x, weight, bias, float(eps))
    return y.reshape(shape) if k > 1 else y


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward takes the manual path on CUDA where the native kernel is
    slow (normalized size not a multiple of 4; module docstring). x: (..., *normalized_shape).

    manual: None (auto), True (always the manual path, e.g. to test it on CPU), False (never).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, manual=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.manual = manual

    def forward(self, x):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.manual)


def replace_layer_norms(module, manual=None):
    """Replace every plain ``nn.LayerNorm`` in the tree of ``module`` by :class:`LayerNorm`,
    in place; returns ``module`` (or, if ``module`` itself is an ``nn.LayerNorm``, its
    replacement).

    The new modules share the old ones' Parameter objects (so values, state_dict keys and any
    optimizer built on them are unchanged), eps, affine settings and training mode.
    """
    def convert(old):
        new = LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                        bias=old.bias is not None, device="meta", manual=manual)
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        return new

    if type(module) is nn.LayerNorm:
        return convert(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                setattr(parent, name, convert(child))
    return module


__all__ = ["LayerNorm", "layer_norm", "replace_layer_norms"]
