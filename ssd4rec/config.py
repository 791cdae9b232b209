"""Configuration: config.yaml, [ssd4rec/models/<model>.yaml,] datasets/<dataset>.yaml, --key=value.

RecBole's ``Config`` does the merging with its own defaults underneath; this module
decides which files take part, parses the command line itself (RecBole would read
``sys.argv`` on its own, wherever it is called from), and checks the values the
model depends on so that a bad value fails here with the key's name, not deep
inside RecBole or PyTorch.
"""

import re
import sys
from pathlib import Path

import yaml

from ssd4rec.data.protocols import protocol_settings
from ssd4rec.errors import SSD4RecError


MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "models"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 (no dot) as a string; learning rates are written that way, and
    RecBole's own loader reads them as floats too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text):
    """yaml.safe_load, with 1e-3 read as a float."""
    return yaml.load(text, Loader=_Loader)


def parse_overrides(argv):
    """['--dataset=ml-1m', '--hidden_size=64'] -> {'dataset': 'ml-1m', 'hidden_size': 64}.

    Values are read as YAML scalars, lists or mappings, like the config files.
    """
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SSD4RecError(f"command-line argument {arg!r}: expected --key=value (e.g. --dataset=ml-1m)")
        key, text = arg[2:].split("=", 1)
        if not key:
            raise SSD4RecError(f"command-line argument {arg!r}: the key is empty")
        try:
            overrides[key] = load_yaml(text) if text else None
        except yaml.YAMLError:
            overrides[key] = text
    return overrides


def read_yaml(path):
    """A config file as a dict; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SSD4RecError(f"config file {path} does not exist")
    try:
        content = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SSD4RecError(f"config file {path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SSD4RecError(f"config file {path}: expected a mapping of key: value lines")
    return content


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fraction(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (check, what was expected). Only keys that a model or the data pipeline
# reads directly; RecBole checks its own.
CHECKS = {
    "hidden_size": (_positive_int, "a positive integer"),
    "num_layers": (_positive_int, "a positive integer"),
    "d_state": (_positive_int, "a positive integer"),
    "d_conv": (_positive_int, "a positive integer"),
    "expand": (_positive_int, "a positive integer"),
    "headdim": (_positive_int, "a positive integer"),
    "chunk_size": (_positive_int, "a positive integer"),
    "MAX_ITEM_LIST_LENGTH": (_positive_int, "a positive integer"),
    "train_batch_size": (_positive_int, "a positive integer"),
    "eval_batch_size": (_positive_int, "a positive integer"),
    "epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "stopping_step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "dropout_prob": (_fraction, "a number in [0, 1)"),
    "maskratio": (_fraction, "a number in [0, 1)"),
    "beta": (_number, "a number"),
    "learning_rate": (lambda v: _number(v) and v > 0, "a positive number"),
    "layer_norm_eps": (lambda v: _number(v) and v > 0, "a positive number"),
    "norm_embedding": (lambda v: isinstance(v, bool), "True or False"),
    "var_len": (lambda v: isinstance(v, bool), "True or False"),
    "max_history_length": (_positive_int, "a positive integer, or null for whole histories"),
    "shared_directions": (lambda v: isinstance(v, bool), "True or False"),
    "align_backward": (lambda v: isinstance(v, bool), "True or False"),
    "scan_scored_only": (lambda v: isinstance(v, bool), "True or False"),
    "backend": (lambda v: v in ("auto", "torch", "triton", "triton_heads"),
                "one of auto, torch, triton, triton_heads"),
    "amp": (lambda v: v in ("none", "bf16"), "one of none, bf16"),
    "tf32": (lambda v: isinstance(v, bool), "True or False"),
    "sync_free_step": (lambda v: isinstance(v, bool), "True or False"),
    "graph_step": (lambda v: isinstance(v, bool) or v == "auto", "True, False or auto"),
    "max_train_seconds": (lambda v: _number(v) and v > 0, "a positive number of seconds, or null for no limit"),
    # RecBole's keys for several processes (ssd4rec.distributed)
    "nproc": (_positive_int, "a positive integer (processes on this machine)"),
    "world_size": (_positive_int, "a positive integer (processes on all machines)"),
    "offset": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
}


def check_values(values, source="config"):
    """Raise SSD4RecError for the first value that is not what its key expects."""
    for key, (ok, expected) in CHECKS.items():
        if key in values and values[key] is not None and not ok(values[key]):
            raise SSD4RecError(f"{source} key {key!r}: expected {expected}, got {values[key]!r}")
    if all(k in values for k in ("hidden_size", "expand", "headdim")):
        inner = values["hidden_size"] * values["expand"]
        if inner % values["headdim"]:
            raise SSD4RecError(
                f"{source} keys 'hidden_size'*'expand' = {inner} must be a multiple of 'headdim' = {values['headdim']}"
            )


def collect_values(config_file, datasets_dir, overrides):
    """Merge config.yaml, the dataset's YAML (if any) and the overrides, in that order.

    Returns (values, config_files): the merged dict and the files that took part.
    """
    files = [Path(overrides.get("config_file") or config_file)]
    values = read_yaml(files[0])
    # A relative data_path in a config file means "next to that file", so that
    # `python main.py` works from any directory; on the command line it is cwd's.
    if isinstance(values.get("data_path"), str) and not Path(values["data_path"]).is_absolute():
        values["data_path"] = str(files[0].resolve().parent / values["data_path"])
    dataset = overrides.get("dataset", values.get("dataset"))
    if not dataset or not isinstance(dataset, str):
        raise SSD4RecError(f"config key 'dataset': expected a dataset name, got {dataset!r}")

    # Models other than SSD4Rec bring their published settings in
    # ssd4rec/models/<model>.yaml; its `dataset_overrides` win over the dataset file,
    # which holds SSD4Rec's per-dataset values.
    model = overrides.get("model", values.get("model"))
    model_file = MODEL_CONFIG_DIR / f"{str(model).lower()}.yaml"
    per_dataset = {}
    if isinstance(model, str) and model_file.is_file():
        model_values = read_yaml(model_file)
        per_dataset = (model_values.pop("dataset_overrides", None) or {}).get(dataset) or {}
        files.append(model_file)
        values.update(model_values)

    dataset_file = Path(datasets_dir) / f"{dataset}.yaml"
    if dataset_file.is_file():
        files.append(dataset_file)
        values.update(read_yaml(dataset_file))
    values.update(per_dataset)
    # `protocol: NAME` sets the evaluation keys, and an --eval_args override is merged into
    # the files' eval_args rather than replacing it (ssd4rec.data.protocols says why).
    values.update(protocol_settings(values, overrides))
    values.update({k: v for k, v in overrides.items() if k not in ("config_file", "eval_args")})
    check_values(values)
    return values, files


def make_recbole_config(model, dataset, values):
    """A RecBole Config from already merged values (RecBole adds its own defaults).

    ``model`` is a class for our models and a name for RecBole's.
    """
    from recbole.config import Config

    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole parses sys.argv itself; we already did
    try:
        values = {k: v for k, v in values.items() if k not in ("model", "dataset")}
        if "gpu_id" in values and values["gpu_id"] is None:
            # `--gpu_id=` (the CPU) parses to None, which RecBole would write into
            # CUDA_VISIBLE_DEVICES as 'None' and still pick CUDA where it has already started
            # in the process; an empty gpu_id is RecBole's own way of saying the CPU.
            values["gpu_id"] = ""
        return Config(model=model, dataset=dataset, config_dict=values)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise SSD4RecError(f"RecBole rejected the configuration: {err}") from None
    finally:
        sys.argv = argv
