"""State in and out of the recurrent mixers: a history split into pieces that hand on their state
equals the history run at once (values and gradients), and the state helpers equal the
recurrences they stand for."""

import math

import pytest
import torch

from ssd4rec.modules.segments import Segments
from ssd4rec.modules.mamba2 import GatedRMSNorm
from ssd4rec.modules.stateful import (
    RecomputedGatedRMSNorm,
    StatefulMamba2Mixer,
    StatefulMambaBlock,
    _GatedRMSNormFn,
    conv_carry_in,
    last_inputs,
    ssd_final_state,
    ssd_state_readout,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def segments(lengths):
    return Segments(torch.tensor(lengths), sum(lengths), max(lengths))


def naive_ssd(x, dt, a, Bm, C, lengths, h0):
    """h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T, y_t = C_t . h_t (one group), per sequence."""
    ys, ends, start = [], [], 0
    for b, n in enumerate(lengths):
        h = h0[b].clone()
        for t in range(start, start + n):
            h = torch.exp(a[t])[:, None, None] * h + dt[t][:, None, None] * x[t][:, :, None] * Bm[t, 0][None, None, :]
            ys.append(torch.einsum("n,hpn->hp", C[t, 0], h))
        ends.append(h)
        start += n
    return torch.stack(ys), torch.stack(ends)


def test_ssd_state_helpers_equal_the_recurrence():
    g = torch.Generator().manual_seed(0)
    lengths, h, p, n = [5, 1, 8], 3, 2, 4
    T = sum(lengths)
    x = torch.randn(T, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(T, h, generator=g, dtype=torch.float64)
    a = -torch.rand(T, h, generator=g, dtype=torch.float64) * 3
    Bm, C = (torch.randn(T, 1, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(len(lengths), h, p, n, generator=g, dtype=torch.float64)
    seg = segments(lengths)
    y0, _ = naive_ssd(torch.zeros_like(x), dt, a, Bm, C, lengths, h0)  # the state's share alone
    torch.testing.assert_close(ssd_state_readout(C, a, h0, seg), y0)
    _, end = naive_ssd(x, dt, a, Bm, C, lengths, h0)
    torch.testing.assert_close(ssd_final_state(x, dt, a, Bm, h0, seg), end)
    _, end0 = naive_ssd(x, dt, a, Bm, C, lengths, torch.zeros_like(h0))
    torch.testing.assert_close(ssd_final_state(x, dt, a, Bm, None, seg), end0)


def test_conv_helpers_equal_a_convolution_over_the_joined_inputs():
    g = torch.Generator().manual_seed(0)
    w, c = 4, 3
    weight = torch.randn(c, w, generator=g, dtype=torch.float64)
    old = torch.randn(2, w - 1, c, generator=g, dtype=torch.float64)
    new = torch.randn(2, 5, c, generator=g, dtype=torch.float64)
    joined = torch.cat([old, new], 1)  # (2, w-1+5, c)
    full = sum(weight[:, k] * joined[:, k:k + 5] for k in range(w))  # outputs at the 5 new steps
    local = sum(weight[:, k] * torch.nn.functional.pad(new, (0, 0, w - 1, 0))[:, k:k + 5] for k in range(w))
    corr = conv_carry_in(weight, old)
    torch.testing.assert_close(local[:, :w - 1] + corr, full[:, :w - 1])
    # last inputs: a short window reaches back into the old ones
    lengths = torch.tensor([5, 2])
    got = last_inputs(new, old, lengths, w - 1)
    torch.testing.assert_close(got[0], new[0, 2:5])
    torch.testing.assert_close(got[1], torch.cat([old[1, 2:], new[1, :2]]))


def split_run(forward, u, lengths, cut):
    """Run every history as its first `cut` tokens, then the rest from the state they left."""
    first = [min(cut, n) for n in lengths]
    rest = [n - f for n, f in zip(lengths, first)]
    parts_a, parts_b, start = [], [], 0
    for n, f in zip(lengths, first):
        parts_a.append(u[start:start + f])
        parts_b.append(u[start + f:start + n])
        start += n
    ya, state = forward(torch.cat(parts_a), first, None, True)
    keep = [i for i, r in enumerate(rest) if r > 0]
    state = [t[keep] for t in state]
    yb, _ = forward(torch.cat([parts_b[i] for i in keep]), [rest[i] for i in keep], state, False)
    # back to history order
    out, ia, ib = [], 0, 0
    for n, f, r in zip(lengths, first, rest):
        out.append(ya[ia:ia + f])
        ia += f
        if r:
            out.append(yb[ib:ib + r])
            ib += r
    return torch.cat(out)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_mamba2_mixer_split_in_two_equals_one_run(cut):
    torch.manual_seed(0)
    mixer = StatefulMamba2Mixer(8, d_state=4, d_conv=4, expand=2, headdim=4, chunk_size=4, backend="torch").double()
    with torch.no_grad():
        mixer.A_log.fill_(math.log(0.05))  # slow decay: the carried state matters
    lengths = [9, 3, 6]
    u = torch.randn(sum(lengths), 8, dtype=torch.float64, requires_grad=True)

    def forward(x, lens, state, want):
        return mixer.forward_segments(x, segments(lens), state, want)

    whole, _ = forward(u, lengths, None, False)
    split = split_run(forward, u, lengths, cut)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    gw = torch.randn_like(whole)
    params = [u] + list(mixer.parameters())
    g_whole = torch.autograd.grad((whole * gw).sum(), params)
    g_split = torch.autograd.grad((split * gw).sum(), params)
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the gated norm computes in float32
    # the state is not negligible here: dropping it changes the second part
    no_state = split_run(lambda x, lens, s, w: forward(x, lens, None, w), u, lengths, cut)
    assert (no_state - whole).abs().max() > 1e-3


@pytest.mark.parametrize("cut", [1, 3])
def test_mamba1_block_split_in_two_equals_one_run(cut):
    torch.manual_seed(0)
    block = StatefulMambaBlock(8, d_state=4, d_conv=4, expand=2, backend="torch").double()
    with torch.no_grad():
        block.A_log.copy_(torch.log(torch.linspace(0.02, 0.2, 4)).repeat(block.d_inner, 1))
    lengths = [7, 2, 5]
    u = torch.randn(sum(lengths), 8, dtype=torch.float64, requires_grad=True)

    def forward(x, lens, state, want):
        seg = segments(lens)
        y, s = block.forward_padded(seg.to_padded(x), seg.lengths, state, want)
        return seg.to_packed(y), s

    whole, _ = forward(u, lengths, None, False)
    split = split_run(forward, u, lengths, cut)
    torch.testing.assert_close(split, whole)
    gw = torch.randn_like(whole)
    params = [u] + list(block.parameters())
    g_whole = torch.autograd.grad((whole * gw).sum(), params)
    g_split = torch.autograd.grad((split * gw).sum(), params)
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b)
    no_state = split_run(lambda x, lens, s, w: forward(x, lens, None, w), u, lengths, cut)
    assert (no_state - whole).abs().max() > 1e-3


def test_mamba2_mixer_padding_the_conv_channels_changes_nothing():
    """What CUDA runs (channels padded to a multiple of 8) equals the unpadded convolution."""
    torch.manual_seed(0)
    mixer = StatefulMamba2Mixer(10, d_state=3, d_conv=4, expand=2, headdim=5, chunk_size=4, backend="torch")
    assert (mixer.d_inner + 2 * mixer.d_state) % 8  # 26 channels: padded to 32
    lengths = [6, 2, 5]
    u = torch.randn(sum(lengths), 10)
    outs = []
    for align in (False, True):
        mixer.align_conv = align
        y, state = mixer.forward_segments(u, segments(lengths), None, True)
        y2, _ = mixer.forward_segments(u, segments(lengths), state, False)
        outs.append((y, y2))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("group_size", [12, 4])
def test_recomputed_gated_norm_equals_the_plain_one(group_size):
    g = torch.Generator().manual_seed(0)
    plain = GatedRMSNorm(12, eps=1e-5, group_size=group_size)
    ours = RecomputedGatedRMSNorm(12, eps=1e-5, group_size=group_size)
    with torch.no_grad():
        plain.weight.normal_(generator=g)
        ours.weight.copy_(plain.weight)
    x, z = (torch.randn(3, 5, 12, generator=g, requires_grad=True) for _ in range(2))
    gy = torch.randn(3, 5, 12, generator=g)
    a, b = plain(x, z), ours(x, z)
    torch.testing.assert_close(b, a)
    ga = torch.autograd.grad((a * gy).sum(), (x, z, plain.weight))
    gb = torch.autograd.grad((b * gy).sum(), (x, z, ours.weight))
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    xd, zd, wd = (t.detach().double().requires_grad_() for t in (x, z, ours.weight))
    assert torch.autograd.gradcheck(lambda p, q, w: _GatedRMSNormFn.apply(p, q, w, 1e-5, group_size), (xd, zd, wd))
