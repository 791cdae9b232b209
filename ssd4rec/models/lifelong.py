"""LifelongRec: causal sequential recommenders on lifelong histories, trained on every position.

Reference (the setting and protocol):
    Jiyuan Yang, Yuanzi Li, Jingyu Zhao, Hanbing Wang, Muyang Ma, Jun Ma, Zhaochun Ren, Mengqi
    Zhang, Xin Xin, Zhumin Chen, Pengjie Ren. "Uncovering Selective State Space Model's
    Capabilities in Lifelong Sequential Recommendation" (Rec-Mamba). arXiv:2403.16371, 2024.

Rec-Mamba shows that a selective SSM keeps SASRec's accuracy on histories of thousands of items
at a fraction of its time and memory. LifelongRec is that experiment in this project: one
RecBole model with a choice of causal backbone (config key ``backbone``, see
``ssd4rec.modules.lifelong_backbones``): ``ssd`` (our Mamba-2 mixer, unidirectional),
``mamba`` (Mamba-1, Mamba4Rec's block), ``sasrec`` (RecBole's Transformer, causal) and
``linrec`` (LinRec's L2-normalised linear attention, causal).

Training (SASRec-style): each user contributes one row, the whole training history
(``ssd4rec.data.lifelong.LifelongDataset``); the history is run once, causally, and the output
at position t is trained to predict item t + 1, at every position. A history of L items costs
O(L) tokens, not the O(L^2) of all its prefixes. Histories are packed (no padding).

Windows. ``MAX_ITEM_LIST_LENGTH`` = W is the most tokens of one history that go through the
backbone at once. A longer history is never truncated (unless ``var_len: False``, which keeps
its last W items, as Rec-Mamba does, or ``max_history_length``, which keeps that many): it is
cut into windows of W tokens from its start, and
the windows run one after another, all users' k-th windows as one packed batch.

- Recurrent backbones (ssd, mamba, linrec): window k's scan starts from the state window k-1
  ended in, per layer (the SSM state and the convolution's last inputs; for linrec the running
  sum k^ v^T), and gradients flow back through that state. So the windows compute exactly one
  run over the whole history, forward and backward (tested): nothing is truncated, not even
  the gradient (linrec's learned positions count from the history's start; positions past
  the table of W share its last row). Memory: in training, every window but the last runs
  under activation checkpointing (``torch.utils.checkpoint``): only its input embeddings,
  outputs and the (small) states are kept, and its activations are recomputed during
  backward, one window at a time. Peak activation memory is that of one window of the batch
  (plus O(L d) per history for those inputs and outputs), for one extra forward pass over all
  windows but the last. Why not detach the state between windows (truncated BPTT)?
  The autograd graph of every window stays alive until backward anyway, so detaching alone
  saves no memory; with checkpointing, carrying the gradient costs nothing extra and keeps
  training identical to the unwindowed model.
- sasrec: attention has no fixed-size state, and its positions only go up to W. Its windows are
  independent segments, cut from the end of the history so that the last one is exactly what
  evaluation sees: each prediction reads at most the last W items, as in SASRec.

Evaluation scores the last position of each user's history. Recurrent backbones run every
window of the history, carrying the state, so the prediction uses the whole history, exactly;
sasrec reads the last W items. ``predict`` (sampled candidates, e.g. ``mode: uni1000``)
encodes each distinct history once, however many candidate rows RecBole repeats it in.

Losses (``loss_type``): ``BCE``, SASRec's (each position's target against one uniformly drawn
other item), and ``CE``, cross-entropy over all items, exact, computed in blocks
(``ssd4rec.modules.losses``). The loss is the mean over all trained positions.

Config keys: backbone, hidden_size, num_layers, inner_size, dropout_prob, attn_dropout_prob,
n_heads (sasrec, linrec), d_state, d_conv, expand, headdim, chunk_size (ssd, mamba, linrec),
layer_norm_eps, backend, compile_glue (ssd: torch.compile the elementwise glue around the
scans, ``ssd4rec.modules.compiled_glue``), scan_row_tokens (ssd: the packed windows' mixers
run as rows of at most this many tokens, ``ssd4rec.modules.segments.RowLayout``; 0 or null:
one row), loss_type, MAX_ITEM_LIST_LENGTH, var_len. Rec-Mamba's settings:
``ssd4rec/models/lifelongrec.yaml``.
"""

import functools
import numbers

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssd4rec.data.dataset import HISTORY_END_FIELD, attach_history_store
from ssd4rec.data.lifelong import LifelongDataset
from ssd4rec.errors import SSD4RecError
from ssd4rec.models.init import sasrec_init
from ssd4rec.modules.compiled_glue import resolve_compile_glue
from ssd4rec.modules.lifelong_backbones import BACKBONES, build_backbone
from ssd4rec.modules.losses import chunked_cross_entropy, sample_negatives, sampled_bce_loss
from ssd4rec.modules.segments import Segments

LOSS_TYPES = ("BCE", "CE")

# Values for keys that RecBole's own defaults do not provide.
DEFAULTS = {"backbone": "ssd", "inner_size": None, "n_heads": 1, "attn_dropout_prob": None,
            "loss_type": "BCE", "layer_norm_eps": 1e-12, "backend": "auto", "compile_glue": "auto"}
# scan_row_tokens when the key is absent (null means off, so it is not in DEFAULTS): one row.
# Rows of 32,768 tokens were 4% faster and took 6% more memory on an H100 (lifelongrec.yaml).
SCAN_ROW_TOKENS = 0


def _scan_row_tokens(config):
    """The config's scan_row_tokens as an int >= 0 (0: one row); absent: SCAN_ROW_TOKENS."""
    value = config["scan_row_tokens"] if "scan_row_tokens" in config else SCAN_ROW_TOKENS
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise SSD4RecError(f"config key 'scan_row_tokens': expected a whole number of tokens >= 0 "
                           f"(0 or null: one row), got {value!r}")
    return int(value)


class Window:
    """One step of the window loop: the k-th window of the first n histories (sorted longest
    first), tokens [lo, lo + length) of each; ``more``: some of them have a later window."""

    def __init__(self, n, lo, lengths, more):
        self.n, self.lo, self.lengths, self.more = n, lo, lengths, more


def plan_windows(lengths, window, aligned_to_end):
    """The windows of histories of the given lengths.

    lengths: (B,) numpy, sorted in decreasing order; window: W. Start-aligned (recurrent
    backbones): window k is [kW, min((k+1)W, L)). End-aligned (sasrec): window k is
    [max(0, L - (k+1)W), L - kW), the last W items first. Window k covers every history
    with L > kW, a prefix of the sorted order. Returns a list of Window with numpy lo, lengths.
    """
    windows = []
    k = 0
    while True:
        n = int((lengths > k * window).sum())
        if n == 0:
            return windows
        L = lengths[:n]
        if aligned_to_end:
            hi = L - k * window
            lo = np.maximum(hi - window, 0)
        else:
            lo = np.full(n, k * window, dtype=L.dtype)
            hi = np.minimum(L, (k + 1) * window)
        windows.append(Window(n, lo, hi - lo, bool((L > (k + 1) * window).any())))
        k += 1


def _flatten(state):
    """Per-layer tuples of tensors (or None) -> (flat tuple of tensors, per-layer sizes)."""
    if state is None:
        return (), None
    return tuple(t for layer in state for t in layer), [len(layer) for layer in state]


def _unflatten(flat, layout):
    if layout is None:
        return None
    state, i = [], 0
    for size in layout:
        state.append(tuple(flat[i:i + size]))
        i += size
    return state


class LifelongRec(SequentialRecommender):
    """A causal backbone trained on every position of lifelong histories, in windows.

    See the module docstring for the design; config keys there.
    """

    dataset_class = LifelongDataset  # one training row per user (ssd4rec.run.build_dataset)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        values = {key: (config[key] if key in config and config[key] is not None else default)
                  for key, default in DEFAULTS.items()}
        if values["backbone"] not in BACKBONES:
            raise SSD4RecError(
                f"config key 'backbone': expected one of {', '.join(BACKBONES)}, got {values['backbone']!r}")
        if values["loss_type"] not in LOSS_TYPES:
            raise SSD4RecError(
                f"config key 'loss_type': LifelongRec supports {', '.join(LOSS_TYPES)}, got {values['loss_type']!r}")
        if values["backbone"] in ("sasrec", "linrec") and config["hidden_size"] % values["n_heads"]:
            raise SSD4RecError(f"config keys 'hidden_size' = {config['hidden_size']} must be a multiple "
                               f"of 'n_heads' = {values['n_heads']}")
        if values["backbone"] == "ssd" and (config["hidden_size"] * config["expand"]) % config["headdim"]:
            raise SSD4RecError(f"config keys 'hidden_size' * 'expand' = {config['hidden_size'] * config['expand']} "
                               f"must be a multiple of 'headdim' = {config['headdim']}")
        compile_glue = resolve_compile_glue(values["compile_glue"], config["device"] if "device" in config else None)
        scan_row_tokens = _scan_row_tokens(config)
        self.backbone_name = values["backbone"]
        self.loss_type = values["loss_type"]
        self.window = int(config["MAX_ITEM_LIST_LENGTH"])
        hidden = config["hidden_size"]
        settings = {
            "hidden_size": hidden,
            "num_layers": config["num_layers"],
            "inner_size": values["inner_size"] or 4 * hidden,
            "dropout_prob": config["dropout_prob"],
            "attn_dropout_prob": (config["dropout_prob"] if values["attn_dropout_prob"] is None
                                  else values["attn_dropout_prob"]),
            "n_heads": values["n_heads"],
            "layer_norm_eps": float(values["layer_norm_eps"]),
            "backend": values["backend"],
            "compile_glue": compile_glue,  # only the ssd backbone uses it
            "scan_row_tokens": scan_row_tokens,  # ditto
        }
        if self.backbone_name in ("ssd", "mamba", "linrec"):
            settings.update({key: config[key] for key in ("d_state", "d_conv", "expand", "headdim", "chunk_size")
                             if key in config})
        self.item_embedding = nn.Embedding(self.n_items, hidden, padding_idx=0)
        self.backbone = build_backbone(self.backbone_name, settings, self.window)
        attach_history_store(self, dataset)
        self.apply(sasrec_init)  # as SASRec, Mamba4Rec and SSD4Rec

    # ----------------------------------------------------------------------------------------
    # The window loop
    # ----------------------------------------------------------------------------------------
    def _sorted_rows(self, interaction):
        """Rows sorted longest history first: (order (B,), first (B,) store index of each
        history's first item, lengths as numpy)."""
        end = interaction[HISTORY_END_FIELD].long()
        lengths = interaction[self.ITEM_SEQ_LEN].long()
        order = torch.argsort(lengths, descending=True, stable=True)
        end, lengths = end[order], lengths[order]
        return order, end - lengths, lengths.cpu().numpy()  # one device sync per batch

    def _window_tokens(self, first, win):
        """Segments, store index of every token, and its position in its history."""
        device = first.device
        lo = torch.from_numpy(win.lo).to(device)
        # The host lengths go along: the ssd mixers plan their rows from them (scan_row_tokens)
        # on the host, with no read back from the device.
        seg = Segments(torch.from_numpy(win.lengths).to(device), int(win.lengths.sum()), int(win.lengths.max()),
                       host_lengths=win.lengths)
        seq = seg.seq_idx.long()
        offset = lo[seq] + seg.position
        return seg, first[:win.n][seq] + offset, offset

    def _run_window(self, e, *flat_state, seg, positions, want_state, layout, out_layout):
        """The backbone on one window, states flattened to tensors for the reentrant checkpoint:
        (e, *state tensors) -> (y, *new state tensors); out_layout receives the new layout."""
        y, new_state = self.backbone(e, positions, seg, _unflatten(flat_state, layout), want_state)
        flat, new_layout = _flatten(new_state)
        out_layout[:] = [] if new_layout is None else [new_layout]
        return (y, *flat)

    def _windows(self, first, lengths):
        """Yield (window, seg, source, output) for every window of the sorted rows, carrying
        the state; in training every window but the last is checkpointed."""
        carries = self.backbone.carries_state
        windows = plan_windows(lengths, self.window, aligned_to_end=not carries)
        flat, layout = (), None
        for k, win in enumerate(windows):
            seg, source, offset = self._window_tokens(first, win)
            # sasrec's positions count from its window's start; the others' from the history's
            positions = seg.position if not carries else offset
            flat = tuple(t[:win.n] for t in flat)
            out_layout = []
            run = functools.partial(self._run_window, seg=seg, positions=positions,
                                    want_state=carries and win.more, layout=layout, out_layout=out_layout)
            e = self.item_embedding(self.history_item[source])
            if torch.is_grad_enabled() and k < len(windows) - 1:
                # Reentrant: the non-reentrant variant refuses a custom Function that reads
                # ctx.saved_tensors twice, as ssd4rec.ops.selective_scan's backward does.
                out = checkpoint(run, e, *flat, use_reentrant=True)
            else:
                out = run(e, *flat)
            y, flat, layout = out[0], out[1:], (out_layout[0] if out_layout else None)
            yield win, seg, source, y

    def encode_last(self, history_end, lengths):
        """history_end, lengths: (B,) -> (B, hidden): the output at each history's last item."""
        order, first, lengths_np = self._sorted_rows({HISTORY_END_FIELD: history_end, self.ITEM_SEQ_LEN: lengths})
        out = None
        if self.backbone.carries_state:
            for win, seg, _, y in self._windows(first, lengths_np):
                # rows whose history ends in this window: the sorted tail win.n - done .. win.n
                ends = lengths_np[:win.n] <= win.lo + win.lengths
                if out is None:
                    out = y.new_empty(len(lengths_np), y.shape[1])
                idx = torch.from_numpy(np.flatnonzero(ends)).to(y.device)
                out[idx] = y[seg.last_index[idx]]
        else:  # independent windows: only the last one (the first, end-aligned) matters
            windows = plan_windows(lengths_np, self.window, aligned_to_end=True)[:1]
            win = windows[0]
            seg, source, _ = self._window_tokens(first, win)
            y, _ = self.backbone(self.item_embedding(self.history_item[source]), seg.position, seg)
            out = y[seg.last_index]
        result = torch.empty_like(out)
        result[order] = out
        return result

    # ----------------------------------------------------------------------------------------
    # RecBole interface
    # ----------------------------------------------------------------------------------------
    def encode_positions(self, history_end, lengths):
        """Every position of every history: (source (T,), output (T, hidden)), where source is
        each token's index in the history store (its target is the next entry), in window order."""
        order, first, lengths_np = self._sorted_rows({HISTORY_END_FIELD: history_end, self.ITEM_SEQ_LEN: lengths})
        sources, outputs = zip(*((source, y) for _, _, source, y in self._windows(first, lengths_np)))
        return torch.cat(sources), torch.cat(outputs)

    def calculate_loss(self, interaction):
        """Mean next-item loss over every position of every history in the batch."""
        source, y = self.encode_positions(interaction[HISTORY_END_FIELD], interaction[self.ITEM_SEQ_LEN])
        targets = self.history_item[source + 1]  # the next item; a history's last one is its row's target
        weight = self.item_embedding.weight
        if self.loss_type == "CE":
            total = chunked_cross_entropy(y, weight, targets)
        else:
            total = sampled_bce_loss(y, weight, targets, sample_negatives(targets, self.n_items))
        return total / targets.numel()

    def _user_vectors(self, interaction):
        """(rows, hidden): each distinct history encoded once, then repeated to its rows."""
        end = interaction[HISTORY_END_FIELD].long()
        lengths = interaction[self.ITEM_SEQ_LEN].long()
        unique_end, inverse = torch.unique(end, return_inverse=True)
        unique_len = lengths.new_zeros(unique_end.shape).scatter(0, inverse, lengths)
        return self.encode_last(unique_end, unique_len)[inverse]

    def predict(self, interaction):
        seq_output = self._user_vectors(interaction)
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        return self._user_vectors(interaction) @ self.item_embedding.weight.T


__all__ = ["LifelongRec", "plan_windows"]
