"""Mamba4Rec as a RecBole sequential recommender, on any device.

Reference:
    Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee.
    "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space
    Models." arXiv:2403.03900, 2024.

    item embedding (padding id 0) -> dropout -> LayerNorm
      -> num_layers x [ h = Mamba(x)
                        h = LayerNorm(Dropout(h) + x)     (num_layers > 1)
                        h = LayerNorm(Dropout(h))         (one layer: no residual, as the paper)
                        h = LayerNorm(h + Dropout(W2 Dropout(GELU(W1 h))))   (FFN, 4x) ]
      -> output at the last real position (item_seq_len - 1) . item embeddings
      -> cross-entropy over all items

It reads RecBole's standard padded batches (``item_id_list``, ``item_length``, from RecBole's
own ``SequentialDataset``). Histories are right-padded; the model is causal (the scan and the
convolution only look back), so the padding after the last real item never reaches the
position that is scored.

``MambaBlock`` is the Mamba-1 block with the parameter names and shapes of mamba_ssm's
``Mamba`` (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state_dicts load in
either direction. Its convolution is ``ssd4rec.ops.causal_conv1d`` and its scan
``ssd4rec.ops.selective_scan``: the causal_conv1d / mamba_ssm CUDA kernels when they import
on a GPU, exact PyTorch otherwise; without mamba_ssm's CUDA kernel the scan's core runs as our
Triton kernel on a GPU (``ssd4rec.ops.selective_scan_triton``) when triton imports.
"""

import math

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from ssd4rec.errors import SSD4RecError
from ssd4rec.models.init import sasrec_init
from ssd4rec.ops.conv1d import causal_conv1d
from ssd4rec.ops.selective_scan import selective_scan

# The config key `backend` is shared with SSD4Rec ("triton" there means "the GPU kernels");
# each op has its own names for the same choice. The scan's "triton" is our Triton kernel
# (ssd4rec.ops.selective_scan_triton), which needs only triton; "auto" prefers mamba_ssm's
# CUDA kernel and falls back to it.
_SCAN_BACKEND = {"auto": "auto", "torch": "torch", "triton": "triton", "triton_heads": "triton", "cuda": "cuda"}
_CONV_BACKEND = {"auto": "auto", "torch": "torch", "triton": "cuda", "triton_heads": "cuda", "cuda": "cuda"}


class MambaBlock(nn.Module):
    """The Mamba-1 block (mamba_ssm's ``Mamba``, without inference caching).

    x: (b, l, d_model) -> (b, l, d_model); d_inner = expand * d_model,
    dt_rank = ceil(d_model / 16) unless given.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, backend="auto"):
        super().__init__()
        if backend not in _SCAN_BACKEND:
            raise ValueError(f"backend must be one of {sorted(_SCAN_BACKEND)}, got {backend!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)  # -> x, z
        # Depthwise causal conv: the Conv1d only holds the weights ((d_inner, 1, d_conv) and
        # bias, as mamba_ssm); the forward pass calls causal_conv1d with them.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)  # -> dt, B, C
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # mamba_ssm's init: dt_proj keeps the input variance, and softplus(dt bias) is
        # log-uniform in [dt_min, dt_max].
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

        # S4D-real init: A = -[1, ..., d_state] for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states):
        b, l, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2 d_inner, l)
        x, z = xz.chunk(2, dim=1)  # (b, d_inner, l) each
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                          backend=_CONV_BACKEND[self.backend])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2 d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d_inner, l); bias in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2),  # B, C: (b, d_state, l)
            D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            backend=_SCAN_BACKEND[self.backend],
        )
        return self.out_proj(y.transpose(1, 2))  # (b, l, d_model)


class FeedForward(nn.Module):
    """Position-wise FFN with residual and LayerNorm: LN(x + Drop(W2 Drop(GELU(W1 x))))."""

    def __init__(self, d_model, inner_size, dropout, layer_norm_eps):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x):
        h = self.dropout(F.gelu(self.w_1(x)))
        return self.LayerNorm(x + self.dropout(self.w_2(h)))


class MambaLayer(nn.Module):
    """Mamba block, dropout, (residual +) LayerNorm, then the FFN."""

    def __init__(self, d_model, d_state, d_conv, expand, dropout, residual, layer_norm_eps,
                 backend="auto"):
        super().__init__()
        self.residual = residual
        self.mamba = MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                                backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout, layer_norm_eps)

    def forward(self, x):
        h = self.dropout(self.mamba(x))
        h = self.LayerNorm(h + x if self.residual else h)
        return self.ffn(h)


class Mamba4Rec(SequentialRecommender):
    """Mamba4Rec on RecBole's padded sequential batches.

    Config keys: hidden_size, num_layers, d_state, d_conv, expand, dropout_prob, loss_type
    (CE only), layer_norm_eps (1e-12 if absent, as the official code), backend (auto, torch,
    or triton / cuda for the GPU kernels). Published settings: hidden 64, 1 layer, d_state 32,
    d_conv 4, expand 2, dropout 0.2.
    """

    # RecBole's padded `item_id_list` batches, not ssd4rec's packed histories.
    packed_histories = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        loss_type = config["loss_type"] if "loss_type" in config else "CE"
        if loss_type != "CE":
            raise SSD4RecError(f"config key 'loss_type': Mamba4Rec supports 'CE' only, got {loss_type!r}")
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        dropout = config["dropout_prob"]
        eps = config["layer_norm_eps"] if "layer_norm_eps" in config else 1e-12
        eps = 1e-12 if eps is None else float(eps)
        backend = (config["backend"] if "backend" in config else None) or "auto"

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=eps)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(self.hidden_size, config["d_state"], config["d_conv"], config["expand"],
                       dropout, residual=self.num_layers > 1, layer_norm_eps=eps, backend=backend)
            for _ in range(self.num_layers)
        )
        self.loss_fct = nn.CrossEntropyLoss()
        # The official code's init; it zeroes dt_proj's bias too (dt = softplus(0) ~ 0.69
        # at the start), while the conv, A_log and D keep mamba_ssm's init.
        self.apply(sasrec_init)

    def forward(self, item_seq, item_seq_len):
        """item_seq: (B, L) right-padded ids, item_seq_len: (B,) -> (B, hidden_size)"""
        x = self.LayerNorm(self.dropout(self.item_embedding(item_seq)))
        for layer in self.mamba_layers:
            x = layer(x)
        return self.gather_indexes(x, item_seq_len - 1)

    def calculate_loss(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = seq_output @ self.item_embedding.weight.T
        return self.loss_fct(logits, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        test_item_emb = self.item_embedding(interaction[self.ITEM_ID])
        return (seq_output * test_item_emb).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.T
