"""LinRec's causal L2-normalised linear attention against its formula written naively."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssd4rec.modules.linrec import LinRecAttention, linrec_attention
from ssd4rec.modules.segments import Segments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_linrec(q, k, v, lengths, state=None):
    """out_t = sum_{s<=t, same sequence} (q^_t . k^_s) v_s / sqrt(d), x^ = elu(x) / ||elu(x)||,
    one sequence and one position at a time; state (B, h, d_v, d_k) adds q^_t . S0. Also
    returns each sequence's S_end = S0 + sum_s v_s k^_s^T."""
    d = q.shape[-1]
    out, ends = [], []
    start = 0
    for b, n in enumerate(lengths):
        for t in range(start, start + n):
            qt = F.elu(q[t]) / F.elu(q[t]).norm(dim=-1, keepdim=True)  # (h, d_k)
            acc = torch.zeros_like(v[t])
            for s in range(start, t + 1):
                ks = F.elu(k[s]) / F.elu(k[s]).norm(dim=-1, keepdim=True)
                acc = acc + (qt * ks).sum(-1, keepdim=True) * v[s]
            if state is not None:
                acc = acc + torch.einsum("hn,hpn->hp", qt, state[b])
            out.append(acc / math.sqrt(d))
        S = torch.zeros(v.shape[1], v.shape[2], q.shape[2], dtype=v.dtype) if state is None else state[b]
        for s in range(start, start + n):
            ks = F.elu(k[s]) / F.elu(k[s]).norm(dim=-1, keepdim=True)
            S = S + v[s][:, :, None] * ks[:, None, :]
        ends.append(S)
        start += n
    return torch.stack(out), torch.stack(ends)


def inputs(lengths, h=2, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    return [torch.randn(T, h, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("lengths,chunk", [([1], 4), ([7], 4), ([5, 1, 9, 3], 4), ([13, 6], 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_values_and_gradients_match_the_naive_formula(lengths, chunk, with_state):
    q, k, v = inputs(lengths)
    seg = Segments(torch.tensor(lengths), sum(lengths), max(lengths))
    g = torch.Generator().manual_seed(1)
    state = (torch.randn(len(lengths), 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
             if with_state else None)
    out, end = linrec_attention(q, k, v, seg, state, want_state=True, chunk_size=chunk, backend="torch")
    ref, ref_end = naive_linrec(q, k, v, lengths, state)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(end, ref_end, rtol=1e-10, atol=1e-12)

    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_end = torch.randn(end.shape, generator=g, dtype=torch.float64)
    leaves = [q, k, v] + ([state] if with_state else [])
    grads = torch.autograd.grad((out * w).sum() + (end * w_end).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum() + (ref_end * w_end).sum(), leaves)
    for name, a, b in zip("qkvS", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_packed_sequences_do_not_see_each_other():
    lengths = [6, 4, 8]
    q, k, v = inputs(lengths, dtype=torch.float32)
    seg = Segments(torch.tensor(lengths), sum(lengths), max(lengths))
    out, _ = linrec_attention(q, k, v, seg, backend="torch")
    start = 0
    for n in lengths:
        alone = Segments(torch.tensor([n]), n, n)
        sl = slice(start, start + n)
        ref, _ = linrec_attention(q[sl], k[sl], v[sl], alone, backend="torch")
        torch.testing.assert_close(out[sl], ref, rtol=1e-5, atol=1e-6)
        start += n


def test_it_is_causal_and_not_softmax_attention():
    """Changing a later token changes nothing before it; the output is not a convex
    combination of the values (no softmax normalisation: LinRec's weights are cosines)."""
    lengths = [10]
    q, k, v = (t.detach() for t in inputs(lengths))
    seg = Segments(torch.tensor(lengths), 10, 10)
    out, _ = linrec_attention(q, k, v, seg, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[6:] += 1.0
    v2[6:] -= 2.0
    out2, _ = linrec_attention(q, k2, v2, seg, backend="torch")
    torch.testing.assert_close(out[:6], out2[:6])
    assert (out[6:] - out2[6:]).abs().max() > 1e-3
    # t = 0 attends to itself only: (q^ . k^) v / sqrt(d), with |q^ . k^| <= 1
    ratio = out[0] / (v[0] / 2.0)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio)) and ratio.abs().max() <= 1.0


def test_layer_is_recbole_layout_and_trains():
    torch.manual_seed(0)
    layer = LinRecAttention(n_heads=2, hidden_size=8, hidden_dropout_prob=0.0, layer_norm_eps=1e-12,
                            chunk_size=4, backend="torch")
    assert {n for n, _ in layer.named_parameters()} >= {"query.weight", "key.weight", "value.weight",
                                                        "dense.weight", "LayerNorm.weight"}
    x = torch.randn(11, 8, requires_grad=True)
    seg = Segments(torch.tensor([5, 6]), 11, 6)
    y, state = layer(x, seg, want_state=True)
    assert y.shape == (11, 8) and state[0].shape == (2, 2, 4, 4)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
