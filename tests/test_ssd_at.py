"""The scan's output at one token per sequence (ssd4rec.ops.ssd_at) and the per-sequence sums it
is built on (ssd4rec.ops.segment_sum), against the full scan and a naive recurrence.

The Triton segment-sum kernel runs here under Triton's CPU interpreter when triton is
installed (TRITON_INTERPRET=1 must be set before triton loads, so that case runs in a
subprocess); tests/test_gpu.py runs it on a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd4rec.data.packing import cu_seqlens_from_lengths, segment_layout
from ssd4rec.modules import BiSSDEncoder
from ssd4rec.ops import segment_sum as segment_sum_module
from ssd4rec.ops.reference import ssd_recurrence_naive
from ssd4rec.ops.segment_sum import segment_broadcast, weighted_segment_sum
from ssd4rec.ops.ssd_at import ssd_scan_at
from ssd4rec.ops.ssd_scan import ssd_scan_xbc
from tests.script_support import skip_unless_interpreter_runs_loops

ROOT = Path(__file__).resolve().parents[1]
# a single token, sequences that cross chunk edges (chunk 8), one much longer than the others
LENGTHS = [3, 9, 1, 12, 6, 70]


def layout(lengths=LENGTHS):
    cu_seqlens = cu_seqlens_from_lengths(torch.tensor(lengths))
    seq_idx, _, _ = segment_layout(cu_seqlens)
    return cu_seqlens, seq_idx


def queries(cu_seqlens, where):
    """(2, K): both rows at each sequence's last token, or row 1 at its first ('first'), or at
    a token in its middle ('middle')."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    last = cu_seqlens[1:] - 1
    other = {"last": last, "first": cu_seqlens[:-1], "middle": cu_seqlens[:-1] + (lengths - 1) // 2}[where]
    return torch.stack([last, other])


def inputs(T, nheads, headdim, d_state, ngroups, D_per_channel=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    xBC = torch.randn(2, T, nheads * headdim + 2 * ngroups * d_state, **f64)
    dt = torch.randn(2, T, nheads, **f64)
    A = -3 * torch.rand(nheads, **f64)
    D = torch.randn(nheads, headdim, **f64) if D_per_channel else torch.randn(nheads, **f64)
    dt_bias = torch.randn(nheads, **f64)
    return [t.requires_grad_() for t in (xBC, dt, A, D, dt_bias)]


def grads(out, leaves, seed=1):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), leaves)


@pytest.mark.parametrize("where", ["last", "first", "middle"])
@pytest.mark.parametrize("ngroups,D_per_channel,dt_limit", [(1, False, (0.0, float("inf"))), (2, True, (0.05, 2.0))],
                         ids=["g1", "g2-Dhp-limit"])
def test_scan_at_equals_full_scan(where, ngroups, D_per_channel, dt_limit):
    """float64: the output and the gradients of xBC, dt, A, D and dt_bias equal the full chunked
    scan's read at the queries."""
    nheads, headdim, d_state = 4, 3, 5
    cu_seqlens, seq_idx = layout()
    T = int(cu_seqlens[-1])
    q = queries(cu_seqlens, where)
    leaves = inputs(T, nheads, headdim, d_state, ngroups, D_per_channel)
    xBC, dt, A, D, dt_bias = leaves
    args = dict(ngroups=ngroups, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
    full = ssd_scan_xbc(xBC, dt, A, headdim, 8, seq_idx=seq_idx.expand(2, -1), backend="torch", **args)
    reference = full.flatten(-2)[torch.arange(2)[:, None], q]
    out = ssd_scan_at(xBC, dt, A, headdim, q, seq_idx, cu_seqlens, **args)
    assert out.shape == reference.shape == (2, len(LENGTHS), nheads * headdim)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for name, a, b in zip("xBC dt A D dt_bias".split(), grads(out, leaves), grads(reference, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=lambda m: f"d{name}: {m}")


def test_scan_at_equals_naive_recurrence():
    """float64, against the step-by-step recurrence (no code shared with either scan)."""
    nheads, headdim, d_state = 2, 4, 3
    cu_seqlens, seq_idx = layout([4, 1, 7])
    T = int(cu_seqlens[-1])
    q = queries(cu_seqlens, "middle")
    xBC, dt, A, D, dt_bias = inputs(T, nheads, headdim, d_state, 1)
    x, B, C = torch.split(xBC, [nheads * headdim, d_state, d_state], dim=-1)
    naive = ssd_recurrence_naive(x.unflatten(-1, (nheads, headdim)), dt, A, B[:, :, None], C[:, :, None], D=D,
                                 dt_bias=dt_bias, seq_idx=seq_idx.expand(2, -1), dt_softplus=True)
    reference = naive.flatten(-2)[torch.arange(2)[:, None], q]
    out = ssd_scan_at(xBC, dt, A, headdim, q, seq_idx, cu_seqlens, D=D, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_scan_at_long_sequence_keeps_float32_precision():
    """float32 with one 4,000-token sequence after others: the cumulative decays, summed over the
    whole stream, lose nothing (taken in float64), so the result stays within float32 rounding
    of the float64 scan's."""
    nheads, headdim, d_state = 2, 4, 3
    cu_seqlens, seq_idx = layout([300, 4000, 5])
    T = int(cu_seqlens[-1])
    q = queries(cu_seqlens, "last")
    xBC, dt, A, D, dt_bias = (t.detach() for t in inputs(T, nheads, headdim, d_state, 1))
    dt = dt - 2  # softplus(dt + bias) about 0.1: thousands of steps sum to a decay of hundreds
    reference = ssd_scan_at(xBC, dt, A, headdim, q, seq_idx, cu_seqlens, D=D, dt_bias=dt_bias, dt_softplus=True)
    out = ssd_scan_at(*(t.float() for t in (xBC, dt, A)), headdim, q, seq_idx, cu_seqlens, D=D.float(),
                      dt_bias=dt_bias.float(), dt_softplus=True)
    assert out.dtype == torch.float32
    assert ((out.double() - reference).abs().max() / reference.abs().max()) < 1e-5


def test_segment_sums_and_their_gradients():
    """weighted_segment_sum and segment_broadcast against loops over the sequences, float64, and
    each one's gradient (gradcheck)."""
    cu_seqlens, seq_idx = layout([2, 5, 1, 4])
    T, K, H, P = int(cu_seqlens[-1]), 4, 3, 2
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, T, H, P, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    out = weighted_segment_sum(v, w, cu_seqlens, seq_idx)
    for k in range(K):
        a, b = int(cu_seqlens[k]), int(cu_seqlens[k + 1])
        torch.testing.assert_close(out[:, k], (w[:, a:b, :, None] * v[:, a:b]).sum(1))
    torch.autograd.gradcheck(lambda v, w: weighted_segment_sum(v, w, cu_seqlens, seq_idx), (v, w))
    torch.autograd.gradcheck(lambda v: weighted_segment_sum(v, None, cu_seqlens, seq_idx), (v,))

    per_sequence = torch.randn(2, K, 3, dtype=torch.float64, generator=g, requires_grad=True)
    spread = segment_broadcast(per_sequence, cu_seqlens, seq_idx)
    torch.testing.assert_close(spread, per_sequence[:, seq_idx.long()])
    torch.autograd.gradcheck(lambda p: segment_broadcast(p, cu_seqlens, seq_idx), (per_sequence,))


def test_segment_sum_fails_when_a_sequence_is_dropped():
    """The check above can fail: a sum over the wrong tokens (a shifted layout) is caught."""
    cu_seqlens, seq_idx = layout([2, 5, 1, 4])
    v = torch.randn(1, int(cu_seqlens[-1]), 1, 2, dtype=torch.float64)
    shifted = torch.roll(seq_idx, 1)
    assert not torch.allclose(weighted_segment_sum(v, None, cu_seqlens, shifted),
                              weighted_segment_sum(v, None, cu_seqlens, seq_idx))


def test_encoder_refuses_output_rows_of_other_sequences():
    """One output row per sequence must be a token of that sequence: said, not miscomputed."""
    encoder = BiSSDEncoder(d_model=8, num_layers=1, d_state=4, headdim=4, chunk_size=8, backend="torch")
    cu_seqlens, _ = layout([2, 3])
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="row b must be a token of sequence b"):
        encoder(x, cu_seqlens, output_index=torch.tensor([4, 0]))


def test_encoder_scored_only_equals_full_scan():
    """The whole encoder (shared directions, both alignments), float64: scanning the last layer
    at the scored rows only equals scanning it fully, for the output and every gradient."""
    cu_seqlens, _ = layout()
    last = cu_seqlens[1:] - 1
    for align in (False, True):
        torch.manual_seed(0)
        args = dict(d_model=16, num_layers=2, d_state=8, headdim=8, chunk_size=8, dropout=0.0, beta=0.3,
                    align_backward=align, backend="torch")
        scored, full = BiSSDEncoder(scan_scored_only=True, **args), BiSSDEncoder(scan_scored_only=False, **args)
        full.load_state_dict(scored.state_dict())
        scored, full = scored.double(), full.double()
        x = torch.randn(int(cu_seqlens[-1]), 16, dtype=torch.float64, requires_grad=True)
        results = []
        for encoder in (scored, full):
            out = encoder(x, cu_seqlens, output_index=last)
            results.append((out,) + grads(out, [x] + list(encoder.parameters())))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


INTERPRETER_CHECK = r"""
import torch
from ssd4rec.data.packing import cu_seqlens_from_lengths, segment_layout
from ssd4rec.ops.segment_sum_triton import segment_sum_triton
cu = cu_seqlens_from_lengths(torch.tensor([1, 9, 4, 13, 0, 6]))
seq_idx, _, _ = segment_layout(cu)
T = int(cu[-1])
for dtype in (torch.float32, torch.float64):
    for H, P in ((3, 5), (4, 4)):  # 15 features: not a multiple of the block
        v = torch.randn(2, T, H * P, dtype=dtype)
        w = torch.randn(2, T, H, dtype=dtype)
        for weights in (w, None):
            got = segment_sum_triton(v, weights, cu)
            terms = v if weights is None else v * weights.repeat_interleave(P, dim=-1)
            want = torch.zeros(2, 6, H * P, dtype=dtype).index_add_(1, seq_idx.long(), terms)
            assert got.dtype == dtype, got.dtype
            err = float((got - want).abs().max())
            assert err < (1e-5 if dtype == torch.float32 else 1e-12), (dtype, H, P, weights is None, err)
print("ok")
"""


def test_triton_segment_sum_under_interpreter():
    """The Triton kernel (one program per sequence and feature block, tiles of 4 tokens under the
    interpreter) against index_add_, float32 and float64, with and without weights, with an
    empty sequence."""
    pytest.importorskip("triton", reason="triton is not installed (the CPU install has none)")
    skip_unless_interpreter_runs_loops()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_no_triton_means_index_add(monkeypatch):
    """Without the kernel (the CPU install) segment_sum is index_add_'s, on any device."""
    monkeypatch.setattr(segment_sum_module, "segment_sum_triton", None)
    cu_seqlens, seq_idx = layout([2, 3])
    v = torch.arange(10.0).reshape(1, 5, 2)
    torch.testing.assert_close(segment_sum_module.segment_sum(v, None, cu_seqlens, seq_idx),
                               torch.tensor([[[2.0, 4.0], [18.0, 21.0]]]))


def test_encoder_scored_only_packed_equals_alone():
    """Packing: the scored-only last layer's output at each sequence's last token, for the
    sequences packed together, equals each sequence run alone (float64, output and input
    gradient), so nothing of one sequence reaches another's sum."""
    torch.manual_seed(0)
    encoder = BiSSDEncoder(d_model=16, num_layers=2, d_state=8, headdim=8, chunk_size=8, dropout=0.0,
                           backend="torch").double()
    cu_seqlens, _ = layout()
    x = torch.randn(int(cu_seqlens[-1]), 16, dtype=torch.float64, requires_grad=True)
    packed = encoder(x, cu_seqlens, output_index=cu_seqlens[1:] - 1)
    weights = torch.randn(packed.shape, dtype=torch.float64)
    (grad_packed,) = torch.autograd.grad((packed * weights).sum(), x)
    for k, length in enumerate(LENGTHS):
        a = int(cu_seqlens[k])
        xk = x.detach()[a:a + length].clone().requires_grad_()
        alone = encoder(xk, torch.tensor([0, length]), output_index=torch.tensor([length - 1]))
        torch.testing.assert_close(packed[k:k + 1], alone, rtol=1e-12, atol=1e-12)
        (grad_alone,) = torch.autograd.grad((alone * weights[k:k + 1]).sum(), xk)
        torch.testing.assert_close(grad_packed[a:a + length], grad_alone, rtol=1e-11, atol=1e-12)
