"""The dataset of lifelong (all-position) training: one training row per user.

:class:`PackedSequentialDataset` makes every interaction (after a user's first) a row: its
history and it as the target. RecBole's leave-one-out split then gives each user one
validation row, one test row and all earlier rows for training. A model trained on every
position at once needs only the longest of those training rows: its history holds every
earlier training target, and position t of it is trained to predict item t + 1. So after the
split, :class:`LifelongDataset` keeps, per user, the training row with the latest target; the
validation and test splits, and with them RecBole's evaluation, stay unchanged.

A history costs O(L) tokens per epoch instead of the O(L^2) of all its prefixes. With
``var_len: True`` a row's history is the user's whole past; with False its last
``MAX_ITEM_LIST_LENGTH`` items (as PackedSequentialDataset).
"""

import torch

from ssd4rec.data.dataset import HISTORY_END_FIELD, PackedSequentialDataset


def last_row_per_user(user_ids, history_end):
    """(N,) row indices, ascending, of each user's row with the largest history_end."""
    n_users = int(user_ids.max()) + 1 if user_ids.numel() else 0
    latest = torch.full((n_users,), -1, dtype=history_end.dtype)
    latest = latest.scatter_reduce(0, user_ids, history_end, reduce="amax")
    return (history_end == latest[user_ids]).nonzero().squeeze(1)


class LifelongDataset(PackedSequentialDataset):
    """PackedSequentialDataset whose training split has one row per user: the whole training
    history (targets at every position), the row just before the user's validation row."""

    def build(self):
        datasets = super().build()
        train = datasets[0]
        keep = last_row_per_user(train.inter_feat[self.uid_field], train.inter_feat[HISTORY_END_FIELD])
        datasets[0] = train.copy(train.inter_feat[keep])
        return datasets
