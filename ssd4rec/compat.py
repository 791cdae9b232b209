"""Make RecBole 1.2.1 run on today's numpy 2, pandas 3 and torch >= 2.6.

RecBole 1.2.1 is the last release and is not maintained for these versions. We pin
RecBole exactly (``recbole==1.2.1`` in pyproject.toml) and patch the three places that
break, each with the smallest change that restores RecBole's own intent:

1. numpy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``. RecBole's
   ``Config.compatibility_settings`` reads them to re-create the legacy aliases
   (``np.float``, ``np.int`` ...) that its metrics code still uses, so ``Config()``
   raises ``AttributeError``. We replace that method with one that builds the same
   aliases from names that exist in numpy 1 and 2.
2. pandas 3 turns on copy-on-write, which makes ``df[col].fillna(..., inplace=True)``
   a silent no-op. RecBole's ``Dataset._fill_nan`` relies on it, so NaNs would survive
   into the id remapping. We replace it with the same logic written as assignments.
3. torch >= 2.6 loads with ``weights_only=True`` by default, and RecBole pickles its
   whole ``Config`` into checkpoints. That is handled where checkpoints are written:
   :mod:`ssd4rec.trainer` saves plain values only, so nothing is patched here.
4. Not a version break but a side effect: RecBole's ``sequential_recommender/sine.py``
   calls ``torch.autograd.set_detect_anomaly(True)`` at import, and importing any of
   RecBole's sequential models (``get_model("SASRec")``) imports it. Anomaly mode records a
   stack trace for every op in forward and checks every backward output for NaN: a debug
   tool that slows every model trained afterwards in the process, baselines and ours, and
   turns a NaN loss into an autograd error. We import that package once here and switch
   anomaly mode back off, unless it was already on before (a user debugging on purpose).
5. Not a break either, but a cost that decides whether the BERT4Rec baseline can be trained
   at all: ``BERT4Rec.reconstruct_test_data`` writes the mask token with a Python loop over
   the batch, indexing with a GPU tensor, so every user costs one kernel launch and one host
   synchronisation. On an H100 shared by five runs, one validation of Amazon Beauty (22,363
   users) took 26 to 163 s against 6 s of training an epoch. We replace it with one scatter
   that writes the same tokens into the same places (tested against RecBole's loop).
6. A cost again, paid on every training batch of BERT4Rec (any model with ``transform:
   mask_itemseq``): RecBole's ``MaskItemSequence.__call__`` masks in a Python loop over every
   position of every sequence (``random.random()`` per position, a list scan per negative
   drawn, lists padded one row at a time), and ``_append_mask_last`` loops over the batch. On
   ML-1M (981,491 training sequences of length up to 200, batch 1024) iterating the train
   loader took about 79 ms a batch, ~76 s an epoch, on the CPU while the GPU waits. We replace
   both methods with tensor ops (:mod:`ssd4rec.data.bert4rec_masking`) that return the same
   fields, shapes, dtypes and distribution (tested against RecBole's loop given the same
   random decisions). The draws come from the transform's own ``torch.Generator`` seeded from
   Python's ``random``: reproducible from the config seed, not RecBole's random stream. The
   ML-1M loader now takes 8.6 to 9.3 ms a batch against 81 ms measured alongside, ~9 s an epoch
   (``scripts/bench_bert4rec_masking.py --loader``, 2 CPU threads).

``apply()`` is idempotent and is called when :mod:`ssd4rec` is imported.
"""

import warnings

import numpy as np
import torch

_LEGACY_NUMPY_ALIASES = {
    "bool": np.bool_,
    "int": np.int64,
    "float": np.float64,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "long": np.int64,
    "unicode": np.str_,
}

_applied = False


def _compatibility_settings(self):
    """Replacement for ``recbole.config.Config.compatibility_settings``."""
    for name, dtype in _LEGACY_NUMPY_ALIASES.items():
        # np.bool and np.str exist again in numpy 2 with the right meaning; keep them. Asking
        # numpy >= 2.3 for a removed alias warns that it will come back as a scalar type; the
        # question is ours, not the user's, so the warning is not shown on every run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            missing = not hasattr(np, name)
        if missing:
            setattr(np, name, dtype)


def _fill_nan(self):
    """Replacement for ``recbole.data.dataset.Dataset._fill_nan`` that survives copy-on-write.

    Token fields get 0 (RecBole's padding id), float fields the column mean, and
    sequence fields an empty array, exactly as RecBole intends.
    """
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _reconstruct_test_data(self, item_seq, item_seq_len):
    """Replacement for ``BERT4Rec.reconstruct_test_data``: the mask token after each history.

    item_seq: (B, L) item ids, left-aligned, 0-padded; item_seq_len: (B,) lengths in 1..L.
    Returns (B, L): the history followed by the mask token, shifted left by one column, as
    RecBole's loop returns it (a full history loses its first item to make room).
    """
    padded = torch.cat((item_seq, item_seq.new_zeros(item_seq.size(0), 1)), dim=-1)  # (B, L+1)
    padded = padded.scatter(1, item_seq_len.view(-1, 1).long(), self.mask_token)
    return padded[:, 1:]


def apply():
    """Patch RecBole in place (once per process)."""
    global _applied
    if _applied:
        return
    from recbole.config import Config
    from recbole.data.dataset import Dataset

    Config.compatibility_settings = _compatibility_settings
    Dataset._fill_nan = _fill_nan
    anomaly_was_on = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (runs sine.py's set_detect_anomaly(True))

    if not anomaly_was_on:
        torch.autograd.set_detect_anomaly(False)
    # Imported only now: any import of RecBole's sequential models runs sine.py (item 4).
    from recbole.model.sequential_recommender.bert4rec import BERT4Rec

    BERT4Rec.reconstruct_test_data = _reconstruct_test_data
    # Item 6: the methods are replaced on RecBole's own class rather than a class registered
    # for "mask_itemseq": construct_transform builds its name-to-class table inside the
    # function, so registering means replacing it where each dataloader module imported it.
    # On the class, every model with mask_itemseq gets it and RecBole's __init__ (field
    # names, mask_item_length, config keys) stays its own.
    from recbole.data.transform import MaskItemSequence

    from ssd4rec.data import bert4rec_masking

    MaskItemSequence.__call__ = bert4rec_masking.mask_item_sequence_call
    MaskItemSequence._append_mask_last = bert4rec_masking.append_mask_last
    _applied = True
