"""Most-popular-item baseline under the sequential protocol.

Scores every item by its number of training interactions, whatever the history.
It runs through the same dataset, split, trainer and RecBole evaluator as SSD4Rec,
so "beats popularity" is measured under identical conditions. (RecBole's own
``Pop`` is a general recommender: it sees a different split and masks history.)
"""

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn


class MostPop(SequentialRecommender):
    """Counts of each item as a target in the training split: (n_items,)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.register_buffer("item_count", torch.zeros(self.n_items))
        # The trainer needs one parameter for its optimizer; it is never used.
        self.unused = nn.Parameter(torch.zeros(1))

    def calculate_loss(self, interaction):
        if self.training:
            self.item_count += torch.bincount(interaction[self.POS_ITEM_ID], minlength=self.n_items).to(
                self.item_count.dtype
            )
        return self.unused.sum() * 0.0

    def predict(self, interaction):
        return self.item_count[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        batch = interaction[self.ITEM_SEQ_LEN].shape[0]
        return self.item_count.expand(batch, -1).clone()
