"""BERT4Rec's training masks (RecBole's ``MaskItemSequence``) built with tensor ops.

RecBole 1.2.1 builds the masked-item-prediction batch of every model configured with
``transform: mask_itemseq`` (BERT4Rec) in a Python loop over every position of every
sequence; :mod:`ssd4rec.compat` (item 6) replaces ``MaskItemSequence.__call__`` and
``MaskItemSequence._append_mask_last`` with :func:`mask_item_sequence_call` and
:func:`append_mask_last` below. The outputs have RecBole's fields, shapes, dtypes, device and
distribution; only the random stream differs (see :func:`masking_generator`).

Shapes: ``item_seq: (B, L)`` item ids, left-aligned and 0-padded; ``item_seq_len: (B,)``;
K = ``mask_item_length`` = ``int(mask_ratio * MAX_ITEM_LIST_LENGTH)``. The transform adds

* ``Mask_<item>_list: (B, L)``: the sequence with masked positions set to ``n_items``;
* ``Pos_<item>, Neg_<item>, MASK_INDEX: (B, K)``: the masked items, one negative for each
  and their positions, the last K masks of the row right-aligned and left-padded with 0.

RecBole's quirks are kept. A row is masked only up to its first 0 (``item_seq_len`` is not
read), while the fine-tuning branch masks position ``item_seq_len - 1``. A row with more than
K masks keeps them all in the sequence but only its last K in the (B, K) fields. MASK_INDEX
pads with 0, which is also the index of a row's first item; BERT4Rec's loss takes
``MASK_INDEX > 0`` as its targets, so a mask on the first item never counts. The fine-tuning
branch returns a deep copy of the batch, the masking branch updates it in place. One
deviation: K = 0 raises (RecBole's padding then keeps every mask and fails on ragged rows).

The random draws (:func:`draw_mask`, :func:`draw_negatives`) are kept apart from the
deterministic construction (:func:`mask_items`, :func:`mask_last`), so that the tests can
feed the construction the decisions RecBole's loop made and compare every tensor.
"""

import random
from copy import deepcopy

import torch

_GENERATOR_ATTR = "_ssd4rec_masking_generator"


def masking_generator(transform):
    """The transform's own ``torch.Generator``, created and seeded on first use.

    Not torch's global RNG: drawing from it would shift the model's dropout stream. The seed
    comes from Python's ``random``, which RecBole's ``init_seed`` seeds (RecBole's loop draws
    from it too), so a run stays reproducible from the config seed. It is drawn at the first
    batch rather than when the dataloader is built: ``ssd4rec.run`` calls ``init_seed(seed +
    rank)`` between the two, so each DDP rank gets its own masks, as with RecBole's loop.
    The draws differ from RecBole's (another generator, other draw order): same distribution,
    different random stream.
    """
    generator = getattr(transform, _GENERATOR_ATTR, None)
    if generator is None:
        generator = torch.Generator().manual_seed(random.getrandbits(63))
        setattr(transform, _GENERATOR_ATTR, generator)
    return generator


def masking_generator_state(transform):
    """The state of the transform's generator (a ByteTensor), None before its first batch."""
    generator = getattr(transform, _GENERATOR_ATTR, None)
    return None if generator is None else generator.get_state()


def set_masking_generator_state(transform, state):
    """Continue the transform's masks from ``state`` (masking_generator_state's); None: seed it
    again from Python's ``random`` at the next batch, as at a run's first."""
    if state is None:
        if hasattr(transform, _GENERATOR_ATTR):
            delattr(transform, _GENERATOR_ATTR)
        return
    generator = torch.Generator()
    generator.set_state(state)
    setattr(transform, _GENERATOR_ATTR, generator)


def valid_positions(item_seq):
    """(B, L) bool: the positions before the row's first 0.

    RecBole's loop stops at the first 0 item, so this is the exact set it can mask even if a
    row had a 0 in the middle (left-aligned rows have none).
    """
    return (item_seq != 0).cumprod(dim=1).bool()


def draw_mask(item_seq, mask_ratio, generator):
    """(B, L) bool: each position before the first 0 masked with probability mask_ratio."""
    # float64 like Python's random.random(), so `u < mask_ratio` has RecBole's probability
    # (a float32 draw would round mask_ratio to float32).
    u = torch.rand(item_seq.shape, generator=generator, dtype=torch.float64)
    return (u < mask_ratio) & valid_positions(item_seq)


def draw_negatives(item_seq, rows, n_items, generator):
    """(N,) negatives for the rows ``rows: (N,)`` of ``item_seq: (B, L)``.

    Each uniform on [1, n_items - 1] and redrawn while it is among its row's items, as
    RecBole's ``_neg_sample`` does (the row compared as a list that includes its 0 padding,
    which cannot be drawn anyway). Like RecBole's loop, this never ends if a row holds every
    item 1..n_items-1.
    """
    # Membership for any number of items without a (B, n_items) table: shift row b's values
    # by b * n_items so that all the sorted rows form one sorted 1-D array, then search it.
    offsets = torch.arange(item_seq.size(0), dtype=torch.long) * n_items
    haystack = (item_seq.sort(dim=1).values + offsets[:, None]).reshape(-1)
    negatives = torch.empty(rows.numel(), dtype=torch.long)
    todo = torch.arange(rows.numel())
    while todo.numel() > 0:
        candidates = torch.randint(1, n_items, (todo.numel(),), generator=generator)
        keys = candidates + offsets[rows[todo]]
        at = torch.searchsorted(haystack, keys).clamp_(max=haystack.numel() - 1)
        taken = haystack[at] == keys
        negatives[todo] = candidates
        todo = todo[taken]
    return negatives


def _right_aligned(values, rows, columns, batch_size, width):
    """(batch_size, width) zeros with ``values`` written at (rows, columns)."""
    out = torch.zeros(batch_size, width, dtype=torch.long)
    out[rows, columns] = values
    return out


def mask_items(item_seq, mask, negatives, n_items, mask_item_length):
    """RecBole's masked-item construction, given the random decisions.

    item_seq: (B, L); mask: (B, L) bool, only positions before the first 0 are used;
    negatives: (B, L), read at the masked positions (the negative for that mask).
    Returns (masked_item_seq (B, L), pos (B, K), neg (B, K), index (B, K)), K =
    mask_item_length.
    """
    batch_size, _ = item_seq.shape
    mask = mask & valid_positions(item_seq)
    masked_item_seq = item_seq.masked_fill(mask, n_items)
    # RecBole's _padding_sequence keeps the LAST K masks of a row when it has more than K:
    # rank each mask from the row's end; the sequence itself keeps every mask.
    from_end = mask.sum(dim=1, keepdim=True) - mask.long().cumsum(dim=1)  # 0 = last mask
    kept = mask & (from_end < mask_item_length)
    rows, positions = kept.nonzero(as_tuple=True)
    columns = mask_item_length - 1 - from_end[rows, positions]
    pos = _right_aligned(item_seq[rows, positions], rows, columns, batch_size, mask_item_length)
    neg = _right_aligned(negatives[rows, positions], rows, columns, batch_size, mask_item_length)
    # Padded with 0 like pos and neg although 0 is also a real position: BERT4Rec's loss takes
    # `masked_index > 0` as its targets, so a mask on a row's first item never counts.
    # RecBole's quirk, kept: the model's loss depends on it.
    index = _right_aligned(positions, rows, columns, batch_size, mask_item_length)
    return masked_item_seq, pos, neg, index


def mask_last(item_seq, item_seq_len, negatives, n_items, mask_item_length):
    """RecBole's ``_append_mask_last`` construction: the mask token on each row's last item.

    item_seq: (B, L); item_seq_len: (B,) in 1..L; negatives: (B,). Returns the same four
    tensors as :func:`mask_items`, each (B, K) holding one value in its last column.
    """
    batch_size, _ = item_seq.shape
    last = (item_seq_len.long() - 1).view(-1, 1)  # (B, 1)
    masked_item_seq = item_seq.scatter(1, last, n_items)
    rows = torch.arange(batch_size)
    columns = torch.full((batch_size,), mask_item_length - 1)
    last_items = item_seq.gather(1, last).view(-1)
    pos = _right_aligned(last_items, rows, columns, batch_size, mask_item_length)
    neg = _right_aligned(negatives, rows, columns, batch_size, mask_item_length)
    index = _right_aligned(last.view(-1), rows, columns, batch_size, mask_item_length)
    return masked_item_seq, pos, neg, index


def _check_mask_item_length(transform):
    # With K = 0 RecBole's `sequence[-0:]` keeps every mask, so its rows are ragged and
    # torch.tensor fails (unless all rows happen to hold as many masks): a config error.
    if transform.mask_item_length < 1:
        raise ValueError(
            f"mask_ratio * MAX_ITEM_LIST_LENGTH = {transform.mask_ratio} * "
            f"{transform.max_seq_length} < 1: no room for a masked item"
        )


def _fields(transform, tensors, device):
    t = transform
    names = (t.MASK_ITEM_SEQ, t.POS_ITEMS, t.NEG_ITEMS, t.MASK_INDEX)
    return {name: tensor.to(device) for name, tensor in zip(names, tensors)}


def append_mask_last(self, interaction, n_items, device):
    """Replacement for ``MaskItemSequence._append_mask_last`` (same signature and result)."""
    from recbole.data.interaction import Interaction

    _check_mask_item_length(self)
    # Built on CPU and moved to `device` at the end, as RecBole does (batches are on CPU here).
    item_seq = interaction[self.ITEM_SEQ].cpu()
    item_seq_len = interaction[self.ITEM_SEQ_LEN].cpu()
    rows = torch.arange(item_seq.size(0))
    negatives = draw_negatives(item_seq, rows, n_items, masking_generator(self))
    tensors = mask_last(item_seq, item_seq_len, negatives, n_items, self.mask_item_length)
    # RecBole returns a deep copy here but updates the batch in place in __call__; kept.
    ft_interaction = deepcopy(interaction)
    ft_interaction.update(Interaction(_fields(self, tensors, device)))
    return ft_interaction


def mask_item_sequence_call(self, dataset, interaction):
    """Replacement for ``MaskItemSequence.__call__`` (same fields, shapes, dtypes, device)."""
    from recbole.data.interaction import Interaction

    _check_mask_item_length(self)
    item_seq = interaction[self.ITEM_SEQ]
    device = item_seq.device
    n_items = dataset.num(self.ITEM_ID)
    generator = masking_generator(self)
    # One draw per batch: with probability ft_ratio the whole batch is a fine-tuning batch.
    if torch.rand((), generator=generator, dtype=torch.float64).item() < self.ft_ratio:
        return self._append_mask_last(interaction, n_items, device)
    item_seq = item_seq.cpu()
    mask = draw_mask(item_seq, self.mask_ratio, generator)
    rows, positions = mask.nonzero(as_tuple=True)
    negatives = torch.zeros_like(item_seq)
    negatives[rows, positions] = draw_negatives(item_seq, rows, n_items, generator)
    tensors = mask_items(item_seq, mask, negatives, n_items, self.mask_item_length)
    interaction.update(Interaction(_fields(self, tensors, device)))
    return interaction
