"""The SSD mixer: a Mamba2 block that runs on packed streams on any device.

Parameter names and shapes equal ``mamba_ssm.modules.mamba2.Mamba2`` (ngroups=1 or
more, no MLP split, rmsnorm=True), so a state_dict loads in either direction:

  in_proj:  Linear(d_model, 2*d_inner + 2*ngroups*d_state + nheads)  -> z, xBC, dt
  conv1d:   depthwise causal Conv1d over xBC, width d_conv
  dt_bias, A_log, D: (nheads,)
  norm:     gated RMSNorm over d_inner (weight (d_inner,))
  out_proj: Linear(d_inner, d_model)

The scan and the convolution take ``seq_idx`` so that neither the state nor the
convolution window crosses from one packed sequence into the next.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssd4rec.ops import causal_conv1d
from ssd4rec.ops.ssd_at import ssd_scan_at
from ssd4rec.ops.ssd_scan import ssd_scan_xbc


# The scan's "triton" backends pair with the causal_conv1d package's CUDA kernel.
CONV_BACKEND = {"auto": "auto", "torch": "torch", "triton": "cuda", "triton_heads": "cuda"}


class GatedRMSNorm(nn.Module):
    """y = rmsnorm(x * silu(z)) * weight, normalised per group of ``group_size`` channels.

    Same maths and parameter as mamba_ssm's ``RMSNormGated`` with norm_before_gate=False.
    """

    def __init__(self, hidden_size, eps=1e-5, group_size=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x, z=None):
        """x, z: (..., hidden_size) -> (..., hidden_size)"""
        dtype = x.dtype
        compute = torch.promote_types(dtype, torch.float32)  # bf16 up to fp32; fp64 stays
        x = x.to(compute)
        if z is not None:
            x = x * F.silu(z.to(compute))
        # F.rms_norm: x * rsqrt(mean(x^2) + eps) [* weight], in fewer passes than spelled out
        gs = self.group_size
        if gs == x.shape[-1]:  # one group: the weight goes in the same call
            return F.rms_norm(x, (gs,), self.weight.to(compute), self.eps).to(dtype)
        grouped = F.rms_norm(x.unflatten(-1, (-1, gs)), (gs,), eps=self.eps)
        return (grouped.flatten(-2) * self.weight.to(compute)).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2 (SSD) mixer over packed sequences.

    Input u: (b, l, d_model) with seq_idx: (b, l) int32 (non-decreasing per row);
    output (b, l, d_model). d_inner = expand * d_model, nheads = d_inner / headdim.
    """

    def __init__(
        self,
        d_model,
        d_state=64,
        d_conv=4,
        expand=2,
        headdim=16,
        ngroups=1,
        chunk_size=256,
        A_init_range=(1, 16),
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        dt_limit=(0.0, float("inf")),
        bias=False,
        conv_bias=True,
        backend="auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand*d_model={self.d_inner} must be a multiple of headdim={headdim}")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.dt_limit = tuple(dt_limit)
        self.backend = backend

        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)

        # dt starts log-uniform in [dt_min, dt_max]; dt_bias stores softplus^-1 of it.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for name in ("dt_bias", "A_log", "D"):
            getattr(self, name)._no_weight_decay = True

        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def project(self, u):
        """u: (b, l, d_model) -> z: (b, l, d_inner), xBC: (b, l, d_inner + 2*ngroups*d_state), dt: (b, l, nheads)"""
        return self.split_projection(self.in_proj(u))

    def projection_widths(self):
        """The widths of z, xBC and dt in in_proj's output, in that order."""
        return (self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state, self.nheads)

    def split_projection(self, projected):
        """in_proj's output (..., P) -> z, xBC, dt (see project)."""
        return torch.split(projected, self.projection_widths(), dim=-1)

    def convolve(self, xBC, seq_idx=None):
        """SiLU(causal depthwise conv) of xBC: (b, l, c) -> (b, l, c), never across a seq_idx change."""
        return causal_conv1d(
            xBC.transpose(1, 2),
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            seq_idx=seq_idx,
            activation="silu",
            backend=CONV_BACKEND[self.backend],
        ).transpose(1, 2)

    def ssm(self, xBC, dt, seq_idx=None):
        """The SSD scan alone.

        xBC: (b, l, d_inner + 2*ngroups*d_state) after the conv, dt: (b, l, nheads) before
        bias and softplus -> y: (b, l, d_inner), before the gated norm
        """
        batch, length, _ = xBC.shape
        y = ssd_scan_xbc(
            xBC,
            dt,
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            self.headdim,
            self.chunk_size,
            ngroups=self.ngroups,
            D=self.D,
            dt_bias=self.dt_bias,
            seq_idx=seq_idx,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            backend=self.backend,
        )
        return y.reshape(batch, length, self.d_inner)

    def ssm_at(self, xBC, dt, seq_idx, query_index, cu_seqlens, compiled=False):
        """The SSD scan's output at one token per sequence only (``ssd4rec.ops.ssd_at``).

        xBC: (b, T, d_inner + 2*ngroups*d_state) after the conv, dt: (b, T, nheads) before bias
        and softplus; seq_idx: (T,) int, sequence ids 0..K-1 in order, the same in every row;
        query_index: (b, K), query k a token of sequence k; cu_seqlens: (K+1,)
        -> ssm(xBC, dt, seq_idx)[r, query_index[r, k]]: (b, K, d_inner)
        """
        return ssd_scan_at(
            xBC,
            dt,
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            self.headdim,
            query_index,
            seq_idx,
            cu_seqlens,
            ngroups=self.ngroups,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            compiled=compiled,
        )

    def scan(self, xBC, dt, z, seq_idx=None):
        """The SSD scan, gated norm and output projection.

        xBC: (b, l, d_inner + 2*ngroups*d_state) after the conv, dt: (b, l, nheads) before
        bias and softplus, z: (b, l, d_inner) -> (b, l, d_model)
        """
        return self.out_proj(self.norm(self.ssm(xBC, dt, seq_idx), z))

    def forward(self, u, seq_idx=None):
        """u: (b, l, d_model), seq_idx: (b, l) int32 or None -> (b, l, d_model)"""
        z, xBC, dt = self.project(u)
        return self.scan(self.convolve(xBC, seq_idx), dt, z, seq_idx)
