"""Recurrent mixers that start from a given state and hand on the state they end in.

LifelongRec (``ssd4rec.models.lifelong``) cuts a history longer than its window into windows
and runs them one after another; each window's scan must start from the state the previous
window ended in, and gradients must flow through that state, so that the windows together
compute exactly what one run over the whole history computes. Neither our chunked SSD scan
nor mamba_ssm's kernels take a different initial state per packed sequence, so the state
enters and leaves through exact identities around the unchanged kernels:

**SSD (Mamba-2)**, per head (decay a_t = dt_t A is one scalar per head):

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T                 h: (p, n), h_{-1} = h0
    =>  y_t = [scan from 0]_t + exp(sum_{s<=t} a_s) C_t . h0            (state readout)
        h_end = exp(sum_s a_s) h0 + sum_s exp(sum_{k>s} a_k) dt_s x_s B_s^T   (final state)

Both sums are batched matmuls over the (B, L) view of the window (``Segments``); the
cumulative decays are summed directly (prefix sums for the readout, suffix sums for the final
state), never as differences of two long cumsums, so nothing cancels.

**Causal convolution** (width w): a window's first w-1 outputs also read the last w-1 inputs
of the previous window. The convolution runs from zero history and the missing taps are added
before the activation:  pre_t += sum_{k <= w-2-t} weight[:, k] * old[t + k]  for t < w-1,
with old (w-1, c) the previous inputs, oldest first.

**Mamba-1** (decay exp(delta_t A) differs per channel and state index, so the readout above
would need a (L, d, n) tensor per sequence): the state goes through the selective scan itself,
as extra steps around the window (delta is 0 on padding, so the state passes padding unchanged):

  n input steps before the window, step j with delta = eps, B = e_j (the j-th unit vector),
    u_j = h0[:, j] exp(-(n-1-j) eps A[:, j]) / eps:  column j of the state receives
    eps u_j once and then decays through the n-1-j later steps, so it equals h0[:, j];
  n readout steps after it, step j with u = 0, delta = eps, C = e_j: the output is
    h_end[:, j] exp((j+1) eps A[:, j]), which is divided out.

eps = 1 / (n max|A|) keeps every factor exp(+-k eps A) within [1/e, e]. Values and gradients
are exact (every step is the scan's own arithmetic), on the CUDA kernel and the PyTorch scan.

All state arithmetic runs in float32 (float64 stays float64) with autocast off, like the scans.
"""

import torch
import torch.nn.functional as F

from ssd4rec.models.mamba4rec import _CONV_BACKEND, _SCAN_BACKEND, MambaBlock
from ssd4rec.modules.mamba2 import CONV_BACKEND, GatedRMSNorm, Mamba2Mixer
from ssd4rec.ops import causal_conv1d, selective_scan, ssd_scan
from ssd4rec.ops.conv1d import _load_cuda_conv1d
from ssd4rec.ops.ssd_scan import _process_dt


def _float(t):
    return t if t is None or t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# SSD state in and out
# --------------------------------------------------------------------------------------------
def ssd_state_readout(C, log_decay, h0, seg):
    """The initial state's share of every output: exp(sum_{s<=t} a_s) C_t . h0[seq(t)].

    C: (T, g, n); log_decay: (T, h) per-step a_t = dt_t A, or None for no decay (linear
    attention); h0: (B, h, p, n). Returns (T, h, p) in float32.
    """
    with torch.autocast(device_type=C.device.type, enabled=False):
        C, h0 = _float(C), _float(h0)
        B, h, p, n = h0.shape
        g = C.shape[1]
        Cp = seg.to_padded(C).transpose(1, 2)  # (B, g, L, n)
        y = Cp @ h0.reshape(B, g, (h // g) * p, n).transpose(-1, -2)  # (B, g, L, r*p)
        y = y.transpose(1, 2).reshape(B, seg.max_len, h, p)
        if log_decay is not None:
            y = y * torch.exp(seg.to_padded(_float(log_decay)).cumsum(1))[..., None]
        return seg.to_packed(y)


def ssd_final_state(x, dt, log_decay, Bm, h0, seg):
    """The state after each sequence's last token.

    x: (T, h, p); dt: (T, h) processed step sizes, or None for 1; log_decay: (T, h) or None for
    no decay; Bm: (T, g, n); h0: (B, h, p, n) or None for zero. Returns (B, h, p, n) float32:
    exp(sum_s a_s) h0 + sum_s exp(sum_{k>s} a_k) dt_s x_s B_s^T.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, Bm = _float(x), _float(Bm)
        h, p = x.shape[1:]
        g, n = Bm.shape[1:]
        weight = None if dt is None else _float(dt)  # (T, h)
        if log_decay is not None:
            a = seg.to_padded(_float(log_decay))  # (B, L, h), 0 on padding
            incl = a.flip(1).cumsum(1).flip(1)  # sum_{k>=s}
            decay = seg.to_packed(torch.exp(incl - a))  # (T, h): exp(sum_{k>s} a_k)
            weight = decay if weight is None else weight * decay
        xw = x if weight is None else x * weight[..., None]
        xp = seg.to_padded(xw)  # (B, L, h, p)
        B = xp.shape[0]
        xp = xp.reshape(B, seg.max_len, g, (h // g) * p).permute(0, 2, 3, 1)  # (B, g, r*p, L)
        Bp = seg.to_padded(Bm).transpose(1, 2)  # (B, g, L, n)
        state = (xp @ Bp).reshape(B, h, p, n)
        if h0 is not None:
            h0 = _float(h0)
            if log_decay is not None:
                h0 = h0 * torch.exp(incl[:, 0])[..., None, None]  # incl[:, 0]: the whole sum
            state = state + h0
        return state


# --------------------------------------------------------------------------------------------
# Convolution state in and out
# --------------------------------------------------------------------------------------------
def conv_carry_in(weight, old):
    """The taps of a window's first w-1 outputs that fall on the previous window.

    weight: (c, w); old: (B, w-1, c), the previous inputs, oldest first.
    Returns (B, w-1, c): entry t = sum_{k=0}^{w-2-t} weight[:, k] * old[:, t+k].
    """
    m = weight.shape[1] - 1
    out = None
    for k in range(m):
        term = F.pad(weight[:, k] * old[:, k:], (0, 0, 0, k))  # rows t = 0..m-1-k, zero after
        out = term if out is None else out + term
    return out


def last_inputs(xp, old, lengths, m):
    """The last m inputs of each sequence, reaching into the previous window if it is short.

    xp: (B, L, c) padded window inputs; old: (B, m, c) or None (zeros: no earlier window);
    lengths: (B,). Returns (B, m, c).
    """
    if old is None:
        old = xp.new_zeros(xp.shape[0], m, xp.shape[2])
    ext = torch.cat([old.to(xp.dtype), xp], dim=1)  # ext[m + t] = x[t]
    index = lengths[:, None] + torch.arange(m, device=xp.device)[None, :]  # (B, m)
    return ext.gather(1, index[..., None].expand(-1, -1, xp.shape[2]))


# --------------------------------------------------------------------------------------------
# Gated RMSNorm that keeps nothing of its own for backward
# --------------------------------------------------------------------------------------------
class _GatedRMSNormFn(torch.autograd.Function):
    """out = v r w with v = x silu(z), r = rsqrt(mean(v^2 over each group) + eps).

    Autograd through the plain form keeps x silu(z), silu(z) and the normalised v, three
    (T, d_inner) tensors per layer (about 1.2 KB a token at d_inner 100); this keeps only x and
    z, which the scan and in_proj keep alive anyway, and recomputes the rest in backward:
        n = v r,   g_v = r (g_n - n mean(g_n n)),   g_n = g_out w,   g_w = sum g_out n,
        g_x = g_v silu(z),   g_z = g_v x silu'(z),   silu'(z) = s (1 + z (1 - s)), s = sigmoid(z).
    """

    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size):
        with torch.autocast(device_type=x.device.type, enabled=False):
            v = _float(x) * F.silu(_float(z))
            if group_size == v.shape[-1]:
                out = F.rms_norm(v, (group_size,), _float(weight), eps)  # one fused pass
            else:
                out = F.rms_norm(v.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2)
                out = out * _float(weight)
        ctx.save_for_backward(x, z, weight)
        ctx.eps, ctx.group_size = eps, group_size
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g_out):
        x, z, weight = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf, zf, wf = _float(x), _float(z), _float(weight)
            s = torch.sigmoid(zf)
            silu = zf * s
            v = (xf * silu).unflatten(-1, (-1, ctx.group_size))  # (..., groups, g)
            r = torch.rsqrt(v.square().mean(-1, keepdim=True) + ctx.eps)
            n = v * r  # normalised
            g = _float(g_out)
            g_w = (g * n.flatten(-2)).reshape(-1, wf.numel()).sum(0)
            g_n = (g * wf).unflatten(-1, (-1, ctx.group_size))
            g_v = (r * (g_n - n * (g_n * n).mean(-1, keepdim=True))).flatten(-2)
            g_x = g_v * silu
            g_z = g_v * xf * s * (1 + zf * (1 - s))
        return g_x.to(x.dtype), g_z.to(z.dtype), g_w.to(weight.dtype), None, None


class RecomputedGatedRMSNorm(GatedRMSNorm):
    """:class:`GatedRMSNorm` (same parameter and result), with a backward that recomputes."""

    def forward(self, x, z=None):
        if z is None:
            return super().forward(x)
        return _GatedRMSNormFn.apply(x, z, self.weight, self.eps, self.group_size)


# --------------------------------------------------------------------------------------------
# Mixers
# --------------------------------------------------------------------------------------------
class StatefulMamba2Mixer(Mamba2Mixer):
    """:class:`Mamba2Mixer` (same parameters) with a state in and a state out.

    State: (conv (B, d_conv-1, conv_dim) the last pre-convolution inputs, ssm (B, h, p, n)).

    On CUDA the convolution's channels are padded to a multiple of 8: with seq_idx,
    causal_conv1d's kernel only takes channel-last rows of whole 16-byte groups, and for other
    counts (100 + 2 x 32 = 164 at Rec-Mamba's hidden size 50) ``causal_conv1d`` falls back to
    the PyTorch convolution, about ten passes over the tokens; the padding (zero weights) costs
    one copy. ``align_conv``: None (on CUDA with the package), True or False. The gated norm
    is :class:`RecomputedGatedRMSNorm` (same parameter, less memory).

    ``scan_row_tokens``: with no state in or out, run the mixer on the packed sequences laid
    out as rows of at most this many tokens (``Segments.row_layout``: whole sequences, seq_idx
    per row) instead of one row of T: mamba_ssm's state passing loops over the chunks of a
    row, so R rows make that loop R times shorter (``segments.RowLayout`` says why it matters).
    0 or None: one row. LifelongRec sets it from its config key of the same name.
    """

    align_conv = None
    scan_row_tokens = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = RecomputedGatedRMSNorm(self.d_inner, eps=self.norm.eps, group_size=self.norm.group_size)

    def _conv(self, xBC, seq_idx, activation):
        """Depthwise causal conv of xBC: (b, l, c) -> (b, l, c), never across seq_idx (b, l)
        changes (b = 1: the packed row; b = R: ``RowLayout``'s rows). Padded, (b, l, c8) is
        contiguous, so its (b, c8, l) transpose is channel-last with every stride a multiple
        of 8, as causal_conv1d's seq_idx kernel needs, for any b."""
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        c = xBC.shape[-1]
        align = self.align_conv
        if align is None:
            align = xBC.is_cuda and self.backend != "torch" and _load_cuda_conv1d()[0] is not None
        pad = (-c) % 8 if align and seq_idx is not None else 0
        if pad:
            xBC = F.pad(xBC, (0, pad))  # (b, l, c8) contiguous: channel-last once transposed
            weight = F.pad(weight, (0, 0, 0, pad))
            bias = None if bias is None else F.pad(bias, (0, pad))
        out = causal_conv1d(xBC.transpose(1, 2), weight, bias, seq_idx=seq_idx, activation=activation,
                            backend=CONV_BACKEND[self.backend]).transpose(1, 2)
        return out[..., :c] if pad else out

    def convolve(self, xBC, seq_idx=None):
        return self._conv(xBC, seq_idx, "silu")

    def forward_segments(self, u, seg, state=None, want_state=False):
        """u: (T, d_model) packed; state: as above or None (zero) -> ((T, d_model), new state or None)."""
        rows = self._row_layout(seg, state, want_state)
        if rows is not None:
            # Back to the packed order after out_proj: the gather moves d_model channels, not
            # the 2 x d_inner of y and z (the norm and out_proj are per token).
            y, z = self._mix(rows.to_rows(u), rows.seq_idx)
            return rows.from_rows(self.out_proj(self.norm(y, z))), None
        y, z, new_state = self.scan_segments(u, seg, state, want_state)
        return self.out_proj(self.norm(y, z)), new_state

    def _row_layout(self, seg, state, want_state):
        """The multi-row layout (``segments.RowLayout``) for the no-state path, or None: one row.

        The path that carries a state in or out keeps the single row: its readout and final
        state are (B, L)-view products over the packed stream (``ssd_state_readout``,
        ``ssd_final_state``), and LifelongRec only takes it for batches that hold a history
        longer than the window."""
        if state is not None or want_state or not self.scan_row_tokens:
            return None
        return seg.row_layout(self.scan_row_tokens)

    def _mix(self, u, seq_idx):
        """in_proj, conv and scan on rows: u: (b, l, d_model), seq_idx: (b, l) int32 ->
        y: (b, l, d_inner) the scan's output, z: (b, l, d_inner) the gate."""
        z, xBC, dt = self.project(u)
        return self.ssm(self.convolve(xBC, seq_idx), dt, seq_idx), z

    def scan_segments(self, u, seg, state=None, want_state=False):
        """Everything up to the gated norm: in_proj, the convolution and the scan.

        u: (T, d_model) packed; state: as above or None (zero). Returns y: (T, d_inner) the
        scan's output (state readout included), z: (T, d_inner) the gate, and the new state or
        None. Split from ``forward_segments`` so that the rest (gated norm, out_proj and the
        layer around the mixer) can run as one compiled region (``ssd4rec.modules.compiled_glue``).
        """
        rows = self._row_layout(seg, state, want_state)
        if rows is not None:
            # z comes back contiguous (on one row it is a strided view of in_proj's output):
            # with compile_glue, a process that sees both paths compiles the tail once more.
            y, z = self._mix(rows.to_rows(u), rows.seq_idx)
            return rows.from_rows(y), rows.from_rows(z), None
        seq_idx = seg.seq_idx[None]  # (1, T)
        if state is None and not want_state:  # no state in or out: the plain mixer's conv and scan
            y, z = self._mix(u[None], seq_idx)
            return y[0], z[0], None
        z, xBC, dt = self.project(u[None])  # (1, T, .)
        weight = self.conv1d.weight.squeeze(1)  # (c, w)
        if state is None:
            xc = self.convolve(xBC, seq_idx)
        else:
            pre = self._conv(xBC, seq_idx, None)
            pre = seg.add_at_starts(pre[0], conv_carry_in(weight, state[0]))
            xc = F.silu(pre)[None]
        T = u.shape[0]
        x, Bm, C = torch.split(
            xc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(1, T, self.nheads, self.headdim)
        Bm = Bm.reshape(1, T, self.ngroups, self.d_state)
        C = C.reshape(1, T, self.ngroups, self.d_state)
        A = -torch.exp(self.A_log.float())
        y = ssd_scan(x, dt, A, Bm, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                     seq_idx=seq_idx, dt_softplus=True, dt_limit=self.dt_limit, backend=self.backend)
        with torch.autocast(device_type=u.device.type, enabled=False):
            dt_eff = _process_dt(_float(dt[0]), _float(self.dt_bias), True, self.dt_limit)  # (T, h)
            log_decay = dt_eff * A
        if state is not None:
            y = y + ssd_state_readout(C[0], log_decay, state[1], seg)[None].to(y.dtype)
        new_state = None
        if want_state:
            m = weight.shape[1] - 1
            conv_state = last_inputs(seg.to_padded(xBC[0]), None if state is None else state[0],
                                     seg.lengths, m)
            ssm_state = ssd_final_state(x[0], dt_eff, log_decay, Bm[0],
                                        None if state is None else state[1], seg)
            new_state = (conv_state, ssm_state)
        return y.reshape(T, self.d_inner), z[0], new_state


class StatefulMambaBlock(MambaBlock):
    """:class:`MambaBlock` (Mamba-1, same parameters) on a padded batch, with a state in and out.

    State: (conv (B, d_conv-1, d_inner), ssm (B, d_inner, d_state)).
    """

    def forward_padded(self, hidden, lengths, state=None, want_state=False):
        """hidden: (B, L, d_model) right-padded, lengths: (B,) -> ((B, L, d_model), new state or None)."""
        if state is None and not want_state:
            return self.forward(hidden), None
        Bsz, L, _ = hidden.shape
        n, m = self.d_state, self.d_conv - 1
        weight = self.conv1d.weight.squeeze(1)  # (d_inner, w)
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            x, z = _float(x), _float(z)
            if state is None:
                xc = causal_conv1d(x, weight, self.conv1d.bias, activation="silu",
                                   backend=_CONV_BACKEND[self.backend])
            else:
                ext = torch.cat([state[0].transpose(1, 2).to(x.dtype), x], dim=2)  # previous inputs first
                xc = causal_conv1d(ext, weight, self.conv1d.bias, activation="silu",
                                   backend=_CONV_BACKEND[self.backend])[:, :, m:]
            x_dbl = self.x_proj(xc.transpose(1, 2))  # (B, L, dt_rank + 2n)
            dt, Bm, C = torch.split(x_dbl, [self.dt_rank, n, n], dim=-1)
            delta = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias).float(),
                               beta=1.0, threshold=20.0)  # (B, L, d_inner), as the kernel's
            valid = torch.arange(L, device=hidden.device)[None, :] < lengths[:, None]
            delta = (delta * valid[..., None]).transpose(1, 2)  # 0 on padding: the state passes it
            A = -torch.exp(self.A_log.float())  # (d_inner, n)
            eps = float(1.0 / (n * A.detach().abs().max().clamp(min=1e-6)))
            steps = torch.arange(n, device=hidden.device, dtype=A.dtype)
            unit = torch.eye(n, device=hidden.device, dtype=A.dtype).expand(Bsz, n, n)  # (B, n_state, n_steps)
            us, deltas, Bs, Cs = [], [], [], []
            if state is not None:
                h0 = _float(state[1])  # (B, d_inner, n)
                us.append(h0 * torch.exp(-(n - 1 - steps) * eps * A) / eps)
                deltas.append(torch.full_like(h0, eps))
                Bs.append(unit)
                Cs.append(torch.zeros_like(unit))
            us.append(xc)
            deltas.append(delta)
            Bs.append(Bm.transpose(1, 2).float())
            Cs.append(C.transpose(1, 2).float())
            if want_state:
                us.append(xc.new_zeros(Bsz, self.d_inner, n))
                deltas.append(xc.new_full((Bsz, self.d_inner, n), eps))
                Bs.append(torch.zeros_like(unit))
                Cs.append(unit)
            y = selective_scan(torch.cat(us, 2), torch.cat(deltas, 2), A, torch.cat(Bs, 2).contiguous(),
                               torch.cat(Cs, 2).contiguous(), backend=_SCAN_BACKEND[self.backend])
            pre = n if state is not None else 0
            new_state = None
            if want_state:
                h_end = y[:, :, pre + L:] * torch.exp(-(steps + 1) * eps * A)  # (B, d_inner, n)
                new_state = (last_inputs(x.transpose(1, 2), None if state is None else state[0], lengths, m),
                             h_end)
            y = (y[:, :, pre:pre + L] + self.D.float()[:, None] * xc) * F.silu(z)
        return self.out_proj(y.transpose(1, 2).to(hidden.dtype)), new_state
