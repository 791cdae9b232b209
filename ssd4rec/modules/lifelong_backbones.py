"""The four causal backbones of LifelongRec, with one interface.

    backbone(e, positions, seg, state, want_state) -> (y, new_state)

e: (T, d) item embeddings of B packed windows (``Segments`` seg), positions: (T,) each
token's position in its user's whole history; state: what the previous windows of these B
histories left (None at a history's start); want_state: also return the state after each
window's last token. ``carries_state`` says whether a backbone has such a state at all.

- ``ssd``: Mamba-2 (SSD) blocks, causal, on the packed stream (``StatefulMamba2Mixer``) --
  Mamba4Rec's layer with the SSD mixer: h = LN(x + Dropout(mixer(x))), then the FFN.
  ``compile_glue``: the elementwise glue around the scans through torch.compile
  (``ssd4rec.modules.compiled_glue``); ``scan_row_tokens``: the mixers' rows
  (``ssd4rec.modules.segments.RowLayout``); the other backbones ignore both keys.
- ``mamba``: Mamba4Rec's Mamba-1 layer (``StatefulMambaBlock``) on the padded view: the
  selective scan has no sequence registers.
- ``sasrec``: SASRec (Kang & McAuley, ICDM 2018) from RecBole's own building blocks:
  learned positions, ``recbole.model.layers.TransformerEncoder`` under a causal mask, on the
  padded view. Attention has no fixed-size state: ``carries_state`` is False.
- ``linrec``: SASRec's layout with LinRec's causal linear attention (``ssd4rec.modules.linrec``)
  on the packed stream; its state is the running sum of k^ v^T.

The recurrent ones start from their embeddings as Mamba4Rec does (LN(Dropout(e)), no
positions); the attention ones as SASRec does (Dropout(LN(e + position))). State layout: one
entry per layer, each a tuple of (B, ...) tensors.

Every LN of every backbone is ``ssd4rec.modules.layer_norm.LayerNorm`` (same parameters and
state_dict keys as ``nn.LayerNorm``): at Rec-Mamba's hidden size 50, PyTorch's CUDA LayerNorm
kernel is slow (that module says why and how much). The modules borrowed from Mamba4Rec and
RecBole (FFNs, ``TransformerEncoder``) get theirs swapped by ``replace_layer_norms``, so the
sasrec baseline runs the same LayerNorm as the others.
"""

import torch
from recbole.model.layers import FeedForward as TransformerFeedForward
from recbole.model.layers import TransformerEncoder
from torch import nn

from ssd4rec.models.mamba4rec import FeedForward
from ssd4rec.modules import compiled_glue
from ssd4rec.modules.layer_norm import LayerNorm, replace_layer_norms
from ssd4rec.modules.linrec import LinRecAttention
from ssd4rec.modules.stateful import StatefulMamba2Mixer, StatefulMambaBlock


class _ResidualMixerLayer(nn.Module):
    """LN(x + Dropout(mixer(x))), then LN(h + Dropout(W2 Dropout(GELU(W1 h)))), as Mamba4Rec."""

    def __init__(self, mixer, d_model, inner_size, dropout, eps):
        super().__init__()
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = LayerNorm(d_model, eps=eps)
        self.ffn = replace_layer_norms(FeedForward(d_model, inner_size, dropout, eps))

    def forward(self, x, y):
        """x: layer input, y: mixer output (same shape)."""
        return self.ffn(self.LayerNorm(x + self.dropout(y)))


class _StatefulStack(nn.Module):
    """Dropout and LayerNorm on the input, then num_layers residual mixer layers; a
    subclass names its mixer (``make_mixer(config, d_model)``) and how it runs it."""

    carries_state = True

    def __init__(self, config):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.dropout = nn.Dropout(config["dropout_prob"])
        self.LayerNorm = LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            _ResidualMixerLayer(self.make_mixer(config, d), d, config["inner_size"], config["dropout_prob"], eps)
            for _ in range(config["num_layers"])
        )


class SSDBackbone(_StatefulStack):
    """compile_glue (config, a bool; LifelongRec resolves the yaml's auto to on for CUDA): run
    the elementwise glue around the scans (the input LN(Dropout(e)), and per layer everything
    after its scan) as torch.compile'd regions, ``ssd4rec.modules.compiled_glue``; the scan
    and the convolution stay eager.
    scan_row_tokens (config, int or None): each mixer's rows (``StatefulMamba2Mixer``)."""

    def __init__(self, config):
        super().__init__(config)
        self.compile_glue = bool(config.get("compile_glue", False))

    @staticmethod
    def make_mixer(config, d):
        mixer = StatefulMamba2Mixer(d, d_state=config["d_state"], d_conv=config["d_conv"],
                                    expand=config["expand"], headdim=config["headdim"],
                                    chunk_size=config["chunk_size"], backend=config["backend"])
        mixer.scan_row_tokens = config.get("scan_row_tokens") or None  # None: one row
        return mixer

    def forward(self, e, positions, seg, state=None, want_state=False):
        if self.compile_glue:
            return self._forward_compiled_glue(e, seg, state, want_state)
        x = self.LayerNorm(self.dropout(e))
        new_state = []
        for i, layer in enumerate(self.layers):
            y, s = layer.mixer.forward_segments(x, seg, None if state is None else state[i], want_state)
            x = layer(x, y)
            new_state.append(s)
        return x, (new_state if want_state else None)

    def _forward_compiled_glue(self, e, seg, state, want_state):
        """forward, same maths, with the glue compiled: e: (T, d) -> ((T, d), new state or None).
        The state only enters the eager part (scan_segments), so both paths are covered."""
        x = compiled_glue.embed_norm(self, e)
        new_state = []
        for i, layer in enumerate(self.layers):
            y, z, s = layer.mixer.scan_segments(x, seg, None if state is None else state[i], want_state)
            x = compiled_glue.residual_tail(layer, x, y, z)
            new_state.append(s)
        return x, (new_state if want_state else None)


class MambaBackbone(_StatefulStack):
    @staticmethod
    def make_mixer(config, d):
        return StatefulMambaBlock(d, d_state=config["d_state"], d_conv=config["d_conv"],
                                  expand=config["expand"], backend=config["backend"])

    def forward(self, e, positions, seg, state=None, want_state=False):
        x = seg.to_padded(self.LayerNorm(self.dropout(e)))  # (B, L, d); causal: padding is never read
        new_state = []
        for i, layer in enumerate(self.layers):
            y, s = layer.mixer.forward_padded(x, seg.lengths, None if state is None else state[i], want_state)
            x = layer(x, y)
            new_state.append(s)
        return seg.to_packed(x), (new_state if want_state else None)


class _PositionEmbedding(nn.Module):
    """SASRec's input: Dropout(LN(e + P[position])), positions past the table share its last row."""

    def __init__(self, config, window):
        super().__init__()
        d = config["hidden_size"]
        self.position_embedding = nn.Embedding(window, d)
        self.LayerNorm = LayerNorm(d, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["dropout_prob"])

    def forward(self, e, positions):
        positions = positions.clamp(max=self.position_embedding.num_embeddings - 1)
        return self.dropout(self.LayerNorm(e + self.position_embedding(positions)))


class SASRecBackbone(nn.Module):
    carries_state = False

    def __init__(self, config, window):
        super().__init__()
        self.embed = _PositionEmbedding(config, window)
        self.encoder = replace_layer_norms(TransformerEncoder(
            n_layers=config["num_layers"], n_heads=config["n_heads"], hidden_size=config["hidden_size"],
            inner_size=config["inner_size"], hidden_dropout_prob=config["dropout_prob"],
            attn_dropout_prob=config["attn_dropout_prob"], hidden_act="gelu",
            layer_norm_eps=config["layer_norm_eps"],
        ))

    def forward(self, e, positions, seg, state=None, want_state=False):
        """positions: (T,) within the window (SASRec's windows are independent)."""
        x = seg.to_padded(self.embed(e, positions))  # (B, L, d), right-padded
        L = x.shape[1]
        # Causal mask, additive as RecBole's: with right padding, position t only ever reads
        # keys 0..t, all real, so no key-padding mask (a (B, 1, L, L) tensor) is needed.
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = torch.zeros(1, 1, L, L, dtype=x.dtype, device=x.device).masked_fill(~causal, -10000.0)
        y = self.encoder(x, mask, output_all_encoded_layers=False)[-1]
        return seg.to_packed(y), None


class LinRecBackbone(nn.Module):
    carries_state = True

    def __init__(self, config, window):
        super().__init__()
        d, eps, p = config["hidden_size"], config["layer_norm_eps"], config["dropout_prob"]
        self.embed = _PositionEmbedding(config, window)
        self.attention = nn.ModuleList(
            LinRecAttention(config["n_heads"], d, p, eps, chunk_size=config["chunk_size"],
                            backend=config["backend"])
            for _ in range(config["num_layers"])
        )
        self.ffn = nn.ModuleList(
            replace_layer_norms(TransformerFeedForward(d, config["inner_size"], p, "gelu", eps))
            for _ in range(config["num_layers"])
        )

    def forward(self, e, positions, seg, state=None, want_state=False):
        x = self.embed(e, positions)
        new_state = []
        for i, (attention, ffn) in enumerate(zip(self.attention, self.ffn)):
            x, s = attention(x, seg, None if state is None else state[i], want_state)
            x = ffn(x)
            new_state.append(s)
        return x, (new_state if want_state else None)


BACKBONES = {"ssd": SSDBackbone, "mamba": MambaBackbone, "sasrec": SASRecBackbone, "linrec": LinRecBackbone}


def build_backbone(name, config, window):
    """The backbone called ``name`` (a key of BACKBONES); window: MAX_ITEM_LIST_LENGTH."""
    cls = BACKBONES[name]
    return cls(config, window) if cls in (SASRecBackbone, LinRecBackbone) else cls(config)
