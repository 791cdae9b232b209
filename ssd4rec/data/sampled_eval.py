"""Sampled-negative evaluation (``eval_args.mode: uniN``) that never ranks a user's own items.

The Rec-Mamba protocol ranks each user's held-out item against N = 1,000 items
drawn uniformly from the items the user never interacted with. RecBole 1.2.1 can
be asked for ``mode: uni1000``, but for sequential models it does not do that:

* **it samples the user's own items.** Sequential models must run with
  ``repeatable: True`` (RecBole's config refuses anything else), which makes
  ``create_samplers`` build a ``RepeatableSampler``; its only excluded item is the
  target itself. Items from the user's history, and at validation time the test
  item, are drawn as "negatives" (about 5% of them on ml-100k).
* **its negatives depend on when it is asked.** It draws from numpy's global RNG
  while the loader is iterated, so each validation epoch gets new negatives, the
  test negatives depend on how much training and validation ran before, and
  evaluating the same checkpoint twice gives two different results.

:class:`UnseenItemSampler` replaces it for the valid/test loaders in uniform mode:
user ``u``'s negatives for phase ``p`` come from a generator seeded with
``(seed, p, u)``, drawn without replacement from the items ``u`` never interacted
with (whole dataset: history, validation and test items). The same seed gives
the same negatives in every epoch, every run and every re-evaluation. A user with
fewer than N unseen items is ranked against all of them (the list is padded with
repeats, which RecBole's scatter of scores into a (users x items) matrix merges).

:func:`data_preparation` is RecBole's ``data_preparation`` with this swap; it works
with RecBole's ``SequentialDataset`` and with ssd4rec's ``PackedSequentialDataset``
(the model's ``predict`` scores each (history, candidate) row).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ssd4rec.errors import SSD4RecError

# Distinct streams for the two evaluation phases (the third element of the seed is the user).
PHASE_CODES = {"valid": 1, "test": 2}


class UserItemIndex:
    """Each user's distinct items, CSR-style: ``items[indptr[u]:indptr[u + 1]]``, sorted."""

    def __init__(self, indptr: np.ndarray, items: np.ndarray):
        self.indptr = indptr
        self.items = items

    @classmethod
    def from_pairs(cls, user_ids, item_ids, n_users: int) -> "UserItemIndex":
        users = np.asarray(user_ids, dtype=np.int64)
        items = np.asarray(item_ids, dtype=np.int64)
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        keep = np.ones(len(users), dtype=bool)
        keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
        users, items = users[keep], items[keep]
        counts = np.bincount(users, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, items)

    def items_of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user]: self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


def _column(feat, field: str) -> np.ndarray:
    col = feat[field]
    return col.numpy() if isinstance(col, torch.Tensor) else np.asarray(col)


def interacted_items(dataset) -> UserItemIndex:
    """Every user's items in ``dataset`` (RecBole internal ids).

    Call it before ``dataset.build()``: afterwards a sequential dataset's rows are
    the augmented samples, which leave out each user's first interaction.
    """
    feat = dataset.inter_feat
    return UserItemIndex.from_pairs(_column(feat, dataset.uid_field), _column(feat, dataset.iid_field),
                                    dataset.user_num)


class UnseenItemSampler:
    """Negatives for evaluation: uniform over the items a user never interacted with.

    ``item_num`` counts RecBole's padding id 0, so real items are 1 .. item_num - 1.
    Has the two things RecBole's ``NegSampleEvalDataLoader`` uses: ``phase`` and
    ``sample_by_user_ids``.
    """

    def __init__(self, index: UserItemIndex, item_num: int, seed: int, phase: str | None = None,
                 describe_user=str):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise SSD4RecError(f"config key 'seed': sampled evaluation needs a non-negative integer, got {seed!r}")
        self.index = index
        self.item_num = int(item_num)
        self.seed = int(seed)
        self.phase = phase
        free = self.item_num - 1 - index.counts()
        full = np.flatnonzero(free <= 0)
        if full.size:
            raise SSD4RecError(
                f"sampled evaluation: user {describe_user(int(full[0]))} (and {full.size - 1} more) interacted "
                f"with every one of the {self.item_num - 1} items, so no negative can be drawn; "
                f"filter such users out (user_inter_num_interval) or use eval_args mode: full"
            )

    def set_phase(self, phase: str) -> "UnseenItemSampler":
        if phase not in PHASE_CODES:
            raise ValueError(f"phase must be one of {sorted(PHASE_CODES)}, got {phase!r}")
        other = copy.copy(self)
        other.phase = phase
        return other

    def negatives(self, user: int, num: int) -> np.ndarray:
        """``num`` item ids for ``user`` in this phase: distinct, unseen, reproducible."""
        if self.phase not in PHASE_CODES:
            raise RuntimeError("call set_phase('valid' or 'test') before sampling")
        used = self.index.items_of(int(user))
        n_free = self.item_num - 1 - used.size
        rng = np.random.default_rng([self.seed, PHASE_CODES[self.phase], int(user)])
        if n_free >= num:
            ranks = rng.choice(n_free, size=num, replace=False)
        else:
            # Fewer unseen items than asked for: rank against all of them; the repeats
            # land on the same (user, item) cell of RecBole's score matrix.
            ranks = np.resize(rng.permutation(n_free), num)
        # The r-th unseen id (0-based) is r + 1 plus the number of used ids at or below it;
        # free_below[j] = how many unseen ids lie below used[j].
        free_below = used - 1 - np.arange(used.size)
        return ranks + 1 + np.searchsorted(free_below, ranks, side="right")

    def sample_by_user_ids(self, user_ids, item_ids, num: int) -> torch.Tensor:
        """RecBole's layout: entry ``j * len(user_ids) + k`` is the j-th negative of ``user_ids[k]``."""
        user_ids = np.asarray(user_ids).reshape(-1)
        out = np.empty((num, len(user_ids)), dtype=np.int64)
        for k, user in enumerate(user_ids):
            out[:, k] = self.negatives(user, num)
        return torch.from_numpy(out.reshape(-1))


def uniform_phases(config) -> list[str]:
    """The evaluation phases whose ``eval_args.mode`` is ``uniN``."""
    phases = []
    for phase in PHASE_CODES:
        args = config[f"{phase}_neg_sample_args"] or {}
        if args.get("distribution") == "uniform" and args.get("sample_num") not in (None, "none"):
            phases.append(phase)
    return phases


def data_preparation(config, dataset):
    """RecBole's ``data_preparation``, with :class:`UnseenItemSampler` for ``uniN`` evaluation.

    Other modes (``full``, ``popN``) are left exactly as RecBole makes them.
    """
    from recbole.data import data_preparation as recbole_data_preparation

    phases = uniform_phases(config)
    index = interacted_items(dataset) if phases else None  # before build() augments the rows
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if phases:
        uid_field = dataset.uid_field
        sampler = UnseenItemSampler(index, dataset.item_num, config["seed"],
                                    describe_user=lambda u: repr(dataset.id2token(uid_field, u)))
        loaders = {"valid": valid_data, "test": test_data}
        for phase in phases:
            loaders[phase]._sampler = sampler.set_phase(phase)
    return train_data, valid_data, test_data


def score_sampled_rows(model, interaction, row_idx: torch.Tensor, item_field: str) -> torch.Tensor:
    """What ``model.predict(interaction)`` returns on a sampled-evaluation batch, 1/(N+1) of the work.

    A ``NegSampleEvalDataLoader`` batch repeats each user's row N + 1 times (the
    target, then N negatives) with only ``item_field`` changed, and ``predict``
    encodes the same history N + 1 times. This encodes it once: one
    ``full_sort_predict`` row per user, then the candidates' scores are picked
    from it. Valid for sequential models whose ``predict`` equals their
    ``full_sort_predict`` at the candidate (true of ssd4rec's models). Memory:
    users in the batch x items.

    ``row_idx``: (rows,) the user (0 .. users-1 within the batch) of every row,
    grouped, as the loader returns it.
    """
    starts = torch.ones_like(row_idx, dtype=torch.bool)
    starts[1:] = row_idx[1:] != row_idx[:-1]
    first_rows = starts.nonzero().squeeze(1)
    if first_rows.numel() != int(row_idx.max()) + 1:
        raise ValueError("row_idx must list each user's rows together (as NegSampleEvalDataLoader does)")
    per_user = model.full_sort_predict(interaction[first_rows])
    return per_user[row_idx, interaction[item_field]]
