"""SSD4Rec as a RecBole sequential recommender.

Reference:
    Haohao Qu, Yifeng Zhang, Liangbo Ning, Wenqi Fan, Qing Li.
    "SSD4Rec: A Structured State Space Duality Model for Efficient Sequential
    Recommendation." arXiv:2409.01192, 2024.

Histories are packed into one stream with no padding (sequence registers, see
:mod:`ssd4rec.data.packing`); the Bi-SSD encoder never mixes sequences; the output
at each sequence's last token is scored against every item with cross-entropy.
Item id 0 is RecBole's padding id; it has a trainable embedding and doubles as the
mask token of training-time item masking, as in the official code.
"""

from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn
from torch.nn import functional as F

from ssd4rec.data.dataset import HISTORY_END_FIELD, attach_history_store
from ssd4rec.data.packing import ROW_WEIGHT_FIELD, host_total_tokens, pack_batch
from ssd4rec.models.init import sasrec_init
from ssd4rec.modules import bissd_glue
from ssd4rec.modules.compiled_glue import resolve_compile_glue
from ssd4rec.modules.bissd import BiSSDEncoder

MASK_TOKEN = 0
# compile_glue when the key is absent, as config.yaml: on for CUDA. Its inductor code is checked
# against eager on the GPU (tests/test_gpu.py); it takes 23% off an H100 bf16 step
# (results/MEASUREMENTS.md).
COMPILE_GLUE = "auto"
# scan_scored_only when the key is absent, as config.yaml: the same function as the full scan
# (tests/test_bissd.py, tests/test_ssd_at.py), for less work.
SCAN_SCORED_ONLY = True


class SSD4Rec(SequentialRecommender):
    """Bidirectional SSD (Mamba2) sequential recommender over packed histories.

    Config keys: hidden_size, num_layers, d_state, d_conv, expand, headdim,
    chunk_size, dropout_prob, beta, norm_embedding, maskratio, var_len,
    shared_directions, align_backward, layer_norm_eps, backend, compile_glue (true, false
    or auto: on for a CUDA device; the embedding norm and each Bi-SSD layer's glue through
    torch.compile, ``ssd4rec.modules.bissd_glue``; absent: COMPILE_GLUE), scan_scored_only
    (the last layer's scan computed at the scored tokens only, ``ssd4rec.ops.ssd_at``;
    absent: SCAN_SCORED_ONLY).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.mask_ratio = config["maskratio"]
        self.norm_embedding = config["norm_embedding"]
        value = config["compile_glue"] if "compile_glue" in config else None
        self.compile_glue = resolve_compile_glue(COMPILE_GLUE if value is None else value,
                                                 config["device"] if "device" in config else None)

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size)
        self.emb_dropout = nn.Dropout(config["dropout_prob"])
        self.emb_layer_norm = nn.LayerNorm(self.hidden_size, eps=config["layer_norm_eps"])
        self.encoder = BiSSDEncoder(
            d_model=self.hidden_size,
            num_layers=config["num_layers"],
            d_state=config["d_state"],
            d_conv=config["d_conv"],
            expand=config["expand"],
            headdim=config["headdim"],
            chunk_size=config["chunk_size"],
            dropout=config["dropout_prob"],
            beta=config["beta"],
            shared_directions=config["shared_directions"],
            align_backward=config["align_backward"],
            layer_norm_eps=config["layer_norm_eps"],
            backend=config["backend"],
            compile_glue=self.compile_glue,
            scan_scored_only=config["scan_scored_only"] if "scan_scored_only" in config else SCAN_SCORED_ONLY,
        )
        self.loss_fct = nn.CrossEntropyLoss()

        attach_history_store(self, dataset)

        self.apply(sasrec_init)  # as the official code

    def pack(self, interaction):
        """Build the packed batch of an interaction batch (masking only in training)."""
        return pack_batch(
            self.history_item,
            self.history_time,
            interaction[HISTORY_END_FIELD],
            interaction[self.ITEM_SEQ_LEN],
            targets=interaction[self.POS_ITEM_ID] if self.POS_ITEM_ID in interaction else None,
            mask_ratio=self.mask_ratio if self.training else 0.0,
            mask_token=MASK_TOKEN,
            total_tokens=host_total_tokens(interaction),
        )

    def forward(self, packed):
        """packed: PackedBatch with T tokens, B sequences -> (B, hidden_size)"""
        x = self.item_embedding(packed.items)
        if self.norm_embedding and self.compile_glue:
            x = bissd_glue.embed_norm(x, self.emb_layer_norm, self.emb_dropout)
        elif self.norm_embedding:
            x = self.emb_layer_norm(self.emb_dropout(x))
        return self.encoder(x, packed.cu_seqlens, packed.seq_idx, packed.reverse_index, packed.last_index)

    def calculate_loss(self, interaction):
        """Cross-entropy over all items at each history's last token, the mean over rows; with
        ROW_WEIGHT_FIELD in the batch, the weighted mean (rows of weight 0 pad the batch)."""
        packed = self.pack(interaction)
        seq_output = self.forward(packed)
        logits = seq_output @ self.item_embedding.weight.T
        if ROW_WEIGHT_FIELD not in interaction:
            return self.loss_fct(logits, packed.targets)
        weight = interaction[ROW_WEIGHT_FIELD]
        per_row = F.cross_entropy(logits, packed.targets, reduction="none")
        return (per_row * weight).sum() / weight.sum()

    def padding_row(self, tokens):
        """The fields of a training sample of ``tokens`` tokens that pads a batch to a fixed
        token count (ssd4rec.graph_step), or None when the store is too short. It is given row
        weight 0, so its history can be any ``tokens`` stored items: the store's first ones."""
        if tokens > self.history_item.numel():
            return None
        return {HISTORY_END_FIELD: tokens, self.ITEM_SEQ_LEN: tokens, self.POS_ITEM_ID: 0}

    def predict(self, interaction):
        seq_output = self.forward(self.pack(interaction))
        test_item_emb = self.item_embedding(interaction[self.ITEM_ID])
        return (seq_output * test_item_emb).sum(-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(self.pack(interaction))
        return seq_output @ self.item_embedding.weight.T
