"""Evaluation protocols by name: ``protocol: recmamba`` instead of five keys.

A protocol fixes how a run is evaluated: the split, the candidate items, the
metrics and the model-selection metric. ``collect_values`` (ssd4rec.config)
applies the named protocol after the config files and before the command line,
so ``--protocol=recmamba --topk=[10]`` still reports @10 only.

It also merges an ``--eval_args={...}`` override into the files' ``eval_args``
instead of replacing it: RecBole fills missing ``eval_args`` keys with its own
defaults (a random 80/10/10 split), so ``--eval_args={mode: uni1000}`` alone would
otherwise silently drop the leave-one-out split.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from ssd4rec.errors import SSD4RecError

LEAVE_ONE_OUT = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user"}

PROTOCOLS = {
    # SSD4Rec (and config.yaml): leave-one-out, every item ranked.
    "ssd4rec": {
        "eval_args": {**LEAVE_ONE_OUT, "mode": "full"},
        "metrics": ["NDCG", "MRR", "Hit"],
        "topk": [10, 20],
        "valid_metric": "NDCG@10",
    },
    # Rec-Mamba (Yang et al., arXiv 2403.16371; official code utils.py / main.py):
    # leave-one-out, the held-out item against 1,000 uniformly sampled items the user
    # never interacted with (ssd4rec.data.sampled_eval), HR and NDCG @5/10/20, the
    # checkpoint with the best validation HR@10 is tested.
    "recmamba": {
        "eval_args": {**LEAVE_ONE_OUT, "mode": "uni1000"},
        "metrics": ["Hit", "NDCG"],
        "topk": [5, 10, 20],
        "valid_metric": "Hit@10",
    },
}


def protocol_settings(values: Mapping, overrides: Mapping) -> dict:
    """The keys that the protocol (and an ``eval_args`` override) set on top of the config files.

    ``values``: the merged config files; ``overrides``: the command line. The
    caller applies the other overrides afterwards, so they win over the protocol.
    """
    name = overrides.get("protocol", values.get("protocol"))
    settings: dict = {}
    eval_args = dict(values.get("eval_args") or {})
    if name is not None:
        if name not in PROTOCOLS:
            raise SSD4RecError(
                f"config key 'protocol': unknown protocol {name!r}; expected one of {', '.join(sorted(PROTOCOLS))}"
            )
        preset = copy.deepcopy(PROTOCOLS[name])  # RecBole keeps (and may change) what it is given
        settings = {k: v for k, v in preset.items() if k != "eval_args"}
        eval_args.update(preset["eval_args"])
    if "eval_args" in overrides:
        given = overrides["eval_args"]
        if not isinstance(given, Mapping):
            raise SSD4RecError(
                f"command-line key 'eval_args': expected a mapping such as {{mode: uni1000}}, got {given!r}"
            )
        eval_args.update(given)
    if name is not None or "eval_args" in overrides:
        settings["eval_args"] = eval_args
    return settings
