"""LinRec's L2-normalised linear attention, causal, over packed sequences.

Reference:
    Langming Liu, Liu Cai, Chi Zhang, Xiangyu Zhao, Jingtong Gao, Wanyu Wang, Yifu Lv, Wenqi
    Fan, Yiqi Wang, Ming He, Zitao Liu, Qing Li. "LinRec: Linear Attention Mechanism for
    Long-term Sequential Recommender Systems." SIGIR 2023.

LinRec replaces softmax(Q K^T / sqrt(d)) V by  rho(phi(Q)) (rho(phi(K))^T V) / sqrt(d), with
phi = ELU and rho the L2 normalisation of every query and every key vector (per token and head,
over its d features; in the paper's notation the rows of Q and the columns of K^T). The
published form attends over the whole sequence; here it is causal, which is what next-item
training on every position needs, and the normalisation is per token, so causality changes
nothing else:

    q^_t = elu(q_t) / ||elu(q_t)||,   k^_t = elu(k_t) / ||elu(k_t)||          (per head)
    out_t = sum_{s <= t, same sequence} (q^_t . k^_s) v_s / sqrt(d_k)
          = q^_t S_t / sqrt(d_k),   S_t = S_{t-1} + k^_t v_t^T               S: (d_k, d_v)

That is the SSD recurrence with no decay (A = 0, dt = 1, x = v, B = k^, C = q^), so it runs on
``ssd4rec.ops.ssd_scan``: chunked in PyTorch on CPU, mamba_ssm's Triton kernel on CUDA, O(T)
time and memory, restarting at every change of ``seq_idx``. A state S0 carried in from an
earlier window adds q^_t S0 to every output (``ssd4rec.modules.stateful``).

Shapes: T packed tokens, B sequences, h heads, d_k = d_v = hidden_size / h.
"""

import math

import torch.nn.functional as F
from torch import nn

from ssd4rec.modules.layer_norm import LayerNorm
from ssd4rec.modules.stateful import ssd_final_state, ssd_state_readout
from ssd4rec.ops import ssd_scan


def linrec_feature(x):
    """phi then rho: x (..., d) -> elu(x) / ||elu(x)||_2 over the last dim (0 stays 0)."""
    return F.normalize(F.elu(x), p=2.0, dim=-1, eps=1e-12)


def linrec_attention(q, k, v, seg, state=None, want_state=False, chunk_size=64, backend="auto"):
    """Causal LinRec attention over B packed sequences.

    q, k: (T, h, d_k), v: (T, h, d_v); seg: ``Segments`` of the B sequences; state: (B, h, d_v,
    d_k) the sum of k^ v^T before each sequence (None: zero). Returns out (T, h, d_v) and, with
    want_state, the state after each sequence's last token (B, h, d_v, d_k), unscaled.
    """
    qn, kn = linrec_feature(q), linrec_feature(k)
    T, h, _ = v.shape
    y = ssd_scan(v[None], v.new_ones(1, T, h), v.new_zeros(h), kn[None], qn[None], chunk_size,
                 seq_idx=seg.seq_idx[None], backend=backend)[0]  # (T, h, d_v)
    if state is not None:
        y = y + ssd_state_readout(qn, None, state, seg).to(y.dtype)
    new_state = ssd_final_state(v, None, None, kn, state, seg) if want_state else None
    return y / math.sqrt(q.shape[-1]), new_state


class LinRecAttention(nn.Module):
    """LinRec's attention sub-layer, in RecBole's MultiHeadAttention layout (query, key, value,
    dense, out_dropout, LayerNorm): x -> LayerNorm(x + Dropout(dense(attention(x))))."""

    def __init__(self, n_heads, hidden_size, hidden_dropout_prob, layer_norm_eps, chunk_size=64,
                 backend="auto"):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_size = hidden_size // n_heads
        self.chunk_size = chunk_size
        self.backend = backend
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps)  # see ssd4rec.modules.layer_norm
        self.out_dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, x, seg, state=None, want_state=False):
        """x: (T, hidden) packed; state: (S (B, h, d, d),) or None -> ((T, hidden), (S,) or None)."""
        heads = (x.shape[0], self.n_heads, self.head_size)
        q, k, v = (proj(x).reshape(heads) for proj in (self.query, self.key, self.value))
        y, new_state = linrec_attention(q, k, v, seg, None if state is None else state[0], want_state,
                                        self.chunk_size, self.backend)
        y = self.dense(y.reshape(x.shape).to(x.dtype))
        return self.LayerNorm(x + self.out_dropout(y)), (None if new_state is None else (new_state,))
