"""TiM4Rec as a RecBole sequential recommender, in two modes.

Reference:
    Hao Fan, Mengyi Zhu, Yanrong Hu, Hailin Feng, Zhijie He, Hongjiu Liu, Qingyang Liu.
    "TiM4Rec: An Efficient Sequential Recommendation Model Based on Time-Aware Structured
    State Space Duality Model." arXiv:2409.16182 (Neurocomputing, 2025).
    Official code: github.com/AlwaysFHao/TiM4Rec (tim4rec.py, ssd.py).

The model (both modes)::

    x    = LayerNorm(Dropout(item_embedding(items)))
    time = Norm(Dropout(scale(gaps)))          gaps: t_i - t_{i-1} per sequence, 0 first;
                                               broadcast to the heads: (.., l, nheads)
    num_layers x:
        h, time = TiSSD(x, time)               dt <- dt * time_dt (ssd4rec.modules.tissd)
        h = LayerNorm(Dropout(h) + x)          (no residual when num_layers == 1, as official)
        x = LayerNorm(Dropout(W2 Dropout(Hardswish(W1 h))) + h)     (FFN, 4x)
    score(last position) = x_last . item_embedding  -> cross-entropy over all items

The FFN uses Hardswish, as TiM4Rec's own ``tim4rec.py`` (not GELU as SSD4Rec); its
LayerNorm epsilon is fixed at 1e-12 as there (the official FeedForward is built without
``norm_eps``). Dropout on the gaps uses ``dropout_prob`` and ``time_dropout_prob`` drops the
inputs of each layer's time MLP and gate, as in the official code. No item masking
(``maskratio`` is SSD4Rec's; TiM4Rec has none). The last layer has no time gate/norm: their
output would feed no layer (in the official code they exist there and get no gradient).

``tim4rec_mode: faithful``: the published architecture
------------------------------------------------------
Each sample becomes a right-padded row of exactly L = ``MAX_ITEM_LIST_LENGTH`` positions,
built on the model's device from the packed dataset's history store (its last L items, item
0 after them), so one dataset class serves both modes. The time layers work over the
position axis: ``LayerNorm(L)`` on the gaps, and in every layer ``Linear(L, L), SiLU,
Linear(L, L)`` (time scale), ``Linear(L, L or 1)`` + sigmoid (gate; per position when
``p2p_residual``), ``LayerNorm(L)``.

What padding changes: the item embeddings of the padding never reach the last real position
(the convolution and the scan are causal), but the position-axis time layers read the gaps
of every position, padding included, so the output at the last real position depends on the
padding's time gaps, and on L. ``time_padding`` decides them:

- ``zero`` (default): padding repeats the last real timestamp, so its gaps are 0; the output
  is then a function of the history alone.
- ``official``: padding has timestamp 0, as RecBole's zero-padded ``timestamp_list`` in the
  official code: the first padding gap is -t_last (about -1e9 s). With ``raw`` scaling this
  one value dominates the LayerNorm over positions, which squeezes every real gap of a short
  history to nearly the same number; kept only to reproduce the published runs.

``time_scaling: auto`` means ``raw`` seconds here (the official input). The official code
also reads times as RecBole float32 (128 s resolution around 2001); here they are exact.

``tim4rec_mode: packed``: sequence registers
-------------------------------------------
Batches are the project's packed streams (no padding, no truncation beyond ``var_len``);
every token carries its sequence id and timestamp. A ``Linear(L, L)`` has no meaning on a
stream of variable-length sequences, so the position-axis layers are replaced by
length-agnostic ones, each keeping what the original does for a sequence:

- gap scaling: ``log1p(gap / time_unit)`` (``time_scaling: auto`` = ``log1p``, unit one
  hour; see :mod:`ssd4rec.data.time_gaps`): bounded, ordered, 0 -> 0, the same value for the
  same physical gap on every dataset. Raw seconds would let one long gap dominate the
  per-sequence statistics below (and overflow half precision).
- ``LayerNorm(L)`` over positions -> per-sequence standardisation from segment statistics
  (mean and variance over the tokens with the same ``seq_idx``), with a learned gain and
  bias (a scalar for the input, one per head in the layers). It keeps the official meaning,
  "this gap relative to this user's gaps", computed on the real tokens only: no padding
  term, any length. Its epsilon is 1e-5 (not ``layer_norm_eps``): with 1e-12, float32
  rounding of a near-constant sequence's variance would be blown up to O(1) noise.
- time-scale ``MLP(L -> L)`` -> a per-token MLP over the h head channels
  (``Linear(h, 4h), SiLU, Linear(4h, h)``): it rescales each gap as a function of the gap
  (and of the other heads' refined gaps in deeper layers). The context the positional MLP
  got from the other positions comes from the per-sequence normalisation (global) and the two
  causal convolutions that follow (local, 2 * (d_conv - 1) previous tokens), both
  sequence-aware.
- gate ``Linear(L -> 1 or L)`` -> a per-token, per-head gate ``sigmoid(Linear(h, h))``
  (the analogue of ``p2p_residual: True``; ``p2p_residual`` applies to faithful mode only).

Every layer here is per token or per sequence, so the model run on a packed batch equals the
model run on each sequence alone (tested), and nothing depends on a fixed length.

Config keys: hidden_size, num_layers, d_state, d_conv, expand, headdim, chunk_size,
dropout_prob, layer_norm_eps, MAX_ITEM_LIST_LENGTH, var_len, backend, and (defaults in
``TIM4REC_DEFAULTS``, the official values, also in ``tim4rec.yaml``): tim4rec_mode,
time_aware, time_dropout_prob, p2p_residual, conv_activation, time_scaling, time_unit,
time_padding, kaiming_init.
"""

from dataclasses import dataclass

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from ssd4rec.data.dataset import HISTORY_END_FIELD, attach_history_store
from ssd4rec.data.packing import host_total_tokens, pack_batch
from ssd4rec.data.time_gaps import scale_gaps, time_gaps
from ssd4rec.errors import SSD4RecError
from ssd4rec.models.init import sasrec_init
from ssd4rec.modules.tissd import CONV_ACTIVATIONS, SegmentNorm, TiSSD

PAD_ITEM = 0
FFN_LAYER_NORM_EPS = 1e-12  # official FeedForward default, whatever norm_eps says
SEGMENT_NORM_EPS = 1e-5  # packed mode's per-sequence normalisation (module docstring)

# The TiM4Rec-only keys and their defaults (official values where the official code has the
# key). The other keys (hidden_size, ...) are shared with SSD4Rec and come from the config.
TIM4REC_DEFAULTS = {
    "tim4rec_mode": "packed",  # packed | faithful
    "time_aware": True,  # official is_time
    "time_dropout_prob": 0.2,  # official time_drop_out (ML-1M; 0.0 for Beauty)
    "p2p_residual": False,  # official: False for ML-1M, True for Beauty (faithful mode only)
    "conv_activation": "silu",  # silu | hardswish (what the official code ran at 4 heads)
    "time_scaling": "auto",  # auto (faithful: raw, packed: log1p) | log1p | raw
    "time_unit": 3600.0,  # seconds; log1p scaling only
    "time_padding": "zero",  # zero | official (faithful mode only)
    "kaiming_init": True,  # official is_kai_ming_init (ML-1M; False for Beauty)
}

_CHOICES = {
    "tim4rec_mode": ("packed", "faithful"),
    "conv_activation": CONV_ACTIVATIONS,
    "time_scaling": ("auto", "log1p", "raw"),
    "time_padding": ("zero", "official"),
}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS = {
    "time_aware": (lambda v: isinstance(v, bool), "True or False"),
    "p2p_residual": (lambda v: isinstance(v, bool), "True or False"),
    "kaiming_init": (lambda v: isinstance(v, bool), "True or False"),
    "time_dropout_prob": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "time_unit": (lambda v: _is_number(v) and v > 0, "a positive number of seconds"),
}


def tim4rec_options(config):
    """The TiM4Rec keys of a config (RecBole Config or dict), defaults filled in and checked."""
    options = {}
    for key, default in TIM4REC_DEFAULTS.items():
        value = config[key] if key in config else None
        options[key] = default if value is None else value
        if key in _CHOICES and options[key] not in _CHOICES[key]:
            raise SSD4RecError(f"config key {key!r}: expected one of {', '.join(_CHOICES[key])}, got {options[key]!r}")
        if key in _CHECKS and not _CHECKS[key][0](options[key]):
            raise SSD4RecError(f"config key {key!r}: expected {_CHECKS[key][1]}, got {options[key]!r}")
    if options["time_scaling"] == "auto":
        options["time_scaling"] = "raw" if options["tim4rec_mode"] == "faithful" else "log1p"
    options["time_unit"] = float(options["time_unit"])
    return options


@dataclass
class PaddedBatch:
    """B right-padded rows of L positions (faithful mode).

    items:      (B, L) item ids, PAD_ITEM after each history
    timestamps: (B, L) float64 times; padding per ``time_padding``
    lengths:    (B,) history length in the row (<= L: the last L items are kept)
    targets:    (B,) next items, or None
    """

    items: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor = None


def pad_batch(history_item, history_time, history_end, lengths, max_length, targets=None, time_padding="zero"):
    """Right-padded rows of the last ``max_length`` items of each history, from the store.

    history_item, history_time: (N,) the dataset's store; history_end, lengths: (B,) the
    samples (see :mod:`ssd4rec.data.packing`); lengths >= 1. Tensor operations only.
    time_padding: "zero": padding repeats the last real timestamp (gap 0); "official":
    padding has timestamp 0, as RecBole's zero-padded timestamp lists.
    """
    history_end = history_end.long()
    n = lengths.long().clamp(max=max_length)
    position = torch.arange(max_length, device=history_end.device)
    valid = position[None, :] < n[:, None]  # (B, L)
    source = (history_end - n)[:, None] + position[None, :]
    source = torch.where(valid, source, (history_end - 1)[:, None])  # padding: the last real item
    items = history_item[source].masked_fill(~valid, PAD_ITEM)
    timestamps = history_time[source]
    if time_padding == "official":
        timestamps = torch.where(valid, timestamps, torch.zeros_like(timestamps))
    elif time_padding != "zero":
        raise ValueError(f"time_padding must be 'zero' or 'official', got {time_padding!r}")
    return PaddedBatch(items=items, timestamps=timestamps, lengths=n, targets=targets)


class FeedForward(nn.Module):
    """LayerNorm(x + Dropout(W2 Dropout(Hardswish(W1 x)))), TiM4Rec's FFN."""

    def __init__(self, d_model, inner_size, dropout, layer_norm_eps=FFN_LAYER_NORM_EPS):
        super().__init__()
        self.fc1 = nn.Linear(d_model, inner_size)
        self.fc2 = nn.Linear(inner_size, d_model)
        self.act = nn.Hardswish()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x):
        h = self.fc2(self.dropout(self.act(self.fc1(x))))
        return self.layer_norm(self.dropout(h) + x)


class TiM4RecLayer(nn.Module):
    """TiSSD -> Dropout -> (+ x if residual) -> LayerNorm -> FFN; passes the time input on."""

    def __init__(self, d_model, residual, dropout, layer_norm_eps, **tissd_args):
        super().__init__()
        self.mixer = TiSSD(d_model, **tissd_args)
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ffn = FeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x, seq_idx=None, time_diff=None, num_segments=None):
        """x: (b, l, d_model), time_diff: (b, l, nheads) -> (b, l, d_model), next time input"""
        h, time_diff = self.mixer(x, seq_idx, time_diff, num_segments)
        h = self.dropout(h)
        if self.residual:
            h = h + x
        return self.ffn(self.layer_norm(h)), time_diff


class TiM4Rec(SequentialRecommender):
    """Time-aware SSD sequential recommender (module docstring), packed or faithful."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        options = tim4rec_options(config)
        self.mode = options["tim4rec_mode"]
        self.time_aware = options["time_aware"]
        self.time_scaling = options["time_scaling"]
        self.time_unit = options["time_unit"]
        self.time_padding = options["time_padding"]
        self.kaiming_init = options["kaiming_init"]

        self.hidden_size = config["hidden_size"]
        num_layers = config["num_layers"]
        dropout = config["dropout_prob"]
        eps = config["layer_norm_eps"]
        if self.mode == "faithful" and not self.max_seq_length:
            raise SSD4RecError("config key 'MAX_ITEM_LIST_LENGTH': faithful mode needs the row length")
        self.nheads = self.hidden_size * config["expand"] // config["headdim"]

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=PAD_ITEM)
        self.emb_dropout = nn.Dropout(dropout)
        self.emb_layer_norm = nn.LayerNorm(self.hidden_size, eps=eps)
        if self.time_aware:
            self.gap_dropout = nn.Dropout(dropout)
            if self.mode == "faithful":
                self.time_norm = nn.LayerNorm(self.max_seq_length, eps=eps)
            else:
                self.time_norm = SegmentNorm(1, eps=SEGMENT_NORM_EPS)

        tissd_args = dict(
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            headdim=config["headdim"],
            chunk_size=config["chunk_size"],
            bias=True,  # official: in_proj and out_proj with bias
            backend=config["backend"] or "auto",
            time_aware=self.time_aware,
            time_mode=self.mode,
            seq_len=self.max_seq_length if self.mode == "faithful" else None,
            time_dropout=options["time_dropout_prob"],
            per_position_gate=options["p2p_residual"],
            time_norm_eps=eps if self.mode == "faithful" else SEGMENT_NORM_EPS,
            conv_activation=options["conv_activation"],
            rmsnorm_eps=eps,
        )
        self.layers = nn.ModuleList(
            TiM4RecLayer(
                self.hidden_size, num_layers > 1, dropout, eps, time_output=i < num_layers - 1, **tissd_args
            )
            for i in range(num_layers)
        )
        self.loss_fct = nn.CrossEntropyLoss()

        attach_history_store(self, dataset)

        self.apply(self._init_weights)

    def _init_weights(self, module):
        """The official init: SASRec's (see ssd4rec.models.init), plus Kaiming-normal
        (fan_out) convolutions with zero bias when ``kaiming_init``."""
        sasrec_init(module)
        if isinstance(module, nn.Conv1d) and self.kaiming_init:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                module.bias.data.zero_()

    # -- batches -----------------------------------------------------------------------------
    def make_batch(self, interaction):
        """The PackedBatch (packed mode) or PaddedBatch (faithful) of an interaction batch."""
        targets = interaction[self.POS_ITEM_ID] if self.POS_ITEM_ID in interaction else None
        if self.mode == "faithful":
            return pad_batch(
                self.history_item, self.history_time, interaction[HISTORY_END_FIELD],
                interaction[self.ITEM_SEQ_LEN], self.max_seq_length, targets=targets,
                time_padding=self.time_padding,
            )
        return pack_batch(
            self.history_item, self.history_time, interaction[HISTORY_END_FIELD],
            interaction[self.ITEM_SEQ_LEN], targets=targets, total_tokens=host_total_tokens(interaction),
        )

    def time_input(self, timestamps, seq_idx=None, num_segments=None):
        """timestamps (b, l) float64 -> the first layer's time input (b, l, nheads)."""
        gaps = time_gaps(timestamps, seq_idx)
        t = scale_gaps(gaps, self.time_scaling, self.time_unit).to(self.item_embedding.weight.dtype)
        t = self.gap_dropout(t)
        if self.mode == "faithful":
            t = self.time_norm(t)
        else:
            t = self.time_norm(t[..., None], seq_idx, num_segments)[..., 0]
        return t[..., None].expand(*t.shape, self.nheads)

    def forward(self, batch):
        """A PackedBatch (packed) or PaddedBatch (faithful) of B sequences -> (B, hidden_size)."""
        if self.mode == "faithful":
            items, timestamps = batch.items, batch.timestamps
            seq_idx, num_segments = None, None
        else:
            items, timestamps = batch.items[None], batch.timestamps[None]
            seq_idx, num_segments = batch.seq_idx[None], batch.cu_seqlens.numel() - 1
        x = self.emb_layer_norm(self.emb_dropout(self.item_embedding(items)))
        time = self.time_input(timestamps, seq_idx, num_segments) if self.time_aware else None
        for layer in self.layers:
            x, time = layer(x, seq_idx, time, num_segments)
        if self.mode == "faithful":
            return x[torch.arange(x.shape[0], device=x.device), batch.lengths - 1]
        return x[0, batch.last_index]

    # -- RecBole interface ---------------------------------------------------------------------
    def calculate_loss(self, interaction):
        batch = self.make_batch(interaction)
        logits = self.forward(batch) @ self.item_embedding.weight.T
        return self.loss_fct(logits, batch.targets)

    def predict(self, interaction):
        seq_output = self.forward(self.make_batch(interaction))
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self.forward(self.make_batch(interaction)) @ self.item_embedding.weight.T
