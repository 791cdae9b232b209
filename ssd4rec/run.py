"""One training (or evaluation) run, end to end: what ``python main.py`` does.

config -> dataset (built from raw files if missing) -> RecBole split and
dataloaders -> model -> RecBole training loop with early stopping on validation
-> test metrics from RecBole's evaluator. Returns the metrics as a dict.
"""

import logging
from pathlib import Path

import torch

from ssd4rec import compat, distributed
from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
from ssd4rec.data.atomic import check_inter_file
from ssd4rec.data.dataset import PackedSequentialDataset
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.errors import SSD4RecError
from ssd4rec.models import MODELS
from ssd4rec.trainer import Trainer, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a checkpoint decides about a run it is loaded into: the architecture and
# the data it was trained on, so that `--checkpoint=PATH` alone rebuilds the model.
CHECKPOINT_KEYS = (
    "dataset", "hidden_size", "num_layers", "d_state", "d_conv", "expand", "headdim",
    "chunk_size", "norm_embedding", "shared_directions", "align_backward", "layer_norm_eps",
    "var_len", "max_history_length", "MAX_ITEM_LIST_LENGTH", "inner_size", "n_layers", "n_heads", "embedding_size",
    "tim4rec_mode", "time_aware", "p2p_residual", "conv_activation", "time_scaling", "time_unit",
    "time_padding", "backbone",
)


def resolve_model(name):
    """Our model class for our names, RecBole's model name for its own."""
    if name in MODELS:
        return MODELS[name]
    from recbole.utils import get_model

    try:
        get_model(name)
    except (ValueError, ImportError, AttributeError):
        known = ", ".join(sorted(MODELS))
        raise SSD4RecError(
            f"config key 'model': unknown model {name!r}; expected one of {known} or a RecBole model name"
        ) from None
    return name


def build_dataset(config, model):
    """Our packed dataset for models that pack histories (or the one a model names in its
    ``dataset_class``), RecBole's padded one otherwise."""
    if isinstance(model, str) or not getattr(model, "packed_histories", True):
        from recbole.data import create_dataset

        return create_dataset(config)
    return getattr(model, "dataset_class", PackedSequentialDataset)(config)


def describe_device(device):
    """'cpu (2 threads)' or the GPU's name, for result records."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def run(argv, root=REPO_ROOT):
    compat.apply()
    from recbole.utils import get_model, init_seed

    # RecBole's data_preparation, but sampled evaluation (uniN) never samples the
    # user's own items and draws the same negatives every time (ssd4rec.data.sampled_eval).
    from ssd4rec.data.sampled_eval import data_preparation

    overrides = parse_overrides(argv)
    checkpoint_path = overrides.pop("checkpoint", None)
    checkpoint = None
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        saved = {k: checkpoint["config"][k] for k in CHECKPOINT_KEYS if k in checkpoint["config"]}
        overrides = {"model": checkpoint["model"], **saved, **overrides}

    values, _ = collect_values(root / "config.yaml", root / "datasets", overrides)
    model_name = values.get("model") or "SSD4Rec"
    model_class = resolve_model(model_name)
    if checkpoint is not None and checkpoint["model"] != model_name:
        raise SSD4RecError(
            f"checkpoint {checkpoint_path} was saved by model {checkpoint['model']!r}, "
            f"but --model={model_name}"
        )
    # Several processes (ssd4rec.distributed): `--nproc=N` spawns N workers, each of which
    # runs this function again; a worker (or a process torchrun started) joins the group.
    world = distributed.plan(values)
    if world.spawn:
        return distributed.spawn(run, (argv, root), world)
    distributed.start(world, values)

    dataset_name = values["dataset"]
    with distributed.rank_zero_first():  # one process builds a missing dataset file
        values["data_path"] = ensure_dataset(
            dataset_name,
            values.get("data_path") or "datasets/",
            raw=values.get("raw"),
            download=bool(values.get("download")),
            options=values,
        )
    check_inter_file(Path(values["data_path"]) / dataset_name / f"{dataset_name}.inter")

    config = make_recbole_config(model_class, dataset_name, values)
    distributed.configure(config, world)
    # TF32 matmuls on Ampere+ GPUs: ~1.4x faster SSD4Rec epochs on an H100
    # (results/MEASUREMENTS.md), at TF32's 10-bit mantissa; off by default so that fp32 means fp32.
    torch.backends.cuda.matmul.allow_tf32 = bool(values.get("tf32"))
    torch.backends.cudnn.allow_tf32 = bool(values.get("tf32"))
    init_seed(config["seed"], config["reproducibility"])
    distributed.init_logger(config)  # RecBole's logger, on rank 0 only
    logger = logging.getLogger()
    logger.info(config)

    dataset = build_dataset(config, model_class)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    distributed.configure_loader(train_data, config)

    # Each rank its own dropout and masking draws, as RecBole does; rank 0's initial
    # weights, those of one process, are copied to the others when DDP wraps the model.
    init_seed(config["seed"] + world.rank, config["reproducibility"])
    model_cls = get_model(model_class) if isinstance(model_class, str) else model_class
    model = model_cls(config, train_data._dataset).to(config["device"])
    logger.info(model)

    resume = checkpoint is not None and "optimizer" in checkpoint and not checkpoint.get("finished", False)
    if checkpoint is not None:
        run_dir = Path(checkpoint_path).resolve().parent
    elif values.get("run_dir"):
        run_dir = Path(values["run_dir"])
    else:
        from recbole.utils import get_local_time

        run_dir = Path(config["checkpoint_dir"]) / f"{model_name}-{dataset_name}-{get_local_time()}"
    run_dir = Path(distributed.from_rank_zero(str(run_dir)))  # the ranks' clocks may read other seconds
    # RecBole's Trainer creates checkpoint_dir with exists-then-makedirs, which races when
    # several ranks start together; make it here first, where existing is fine.
    Path(config["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, model, run_dir)
    show_progress = bool(config["show_progress"])

    if checkpoint is None or resume:
        if resume:
            trainer.resume_checkpoint(checkpoint_path)
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=show_progress
        )
        model_file = trainer.saved_model_file
    else:
        model_file = checkpoint_path
        best_valid_result = trainer.evaluate(valid_data, load_best_model=True, model_file=model_file)
        best_valid_score = None
    test_result = trainer.evaluate(test_data, load_best_model=True, model_file=model_file, show_progress=show_progress)

    result = {
        "model": model_name,
        "dataset": dataset_name,
        "best_valid_score": None if best_valid_score is None else float(best_valid_score),
        "best_valid_result": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "test_result": {k: float(v) for k, v in (test_result or {}).items()},
        "checkpoint": str(model_file),
        "epochs_run": len(trainer.epoch_seconds),
        "seconds_per_epoch": trainer.epoch_seconds,
        # Why training ended: "early_stopping", "time_budget" (max_train_seconds; details in
        # "time_budget") or "epochs"; None when a finished run was only evaluated.
        "stopped_by": trainer.stopped_by,
        "time_budget": trainer.stopped_by_time_budget,
        "device": describe_device(config["device"]),
        "world_size": world.size,
    }
    # What each rank trained on (a collective: every rank gets here).
    rows_steps = distributed.gather((trainer.rows_trained, trainer.steps_trained))
    result["train_rows_per_rank"] = [rows for rows, _ in rows_steps]
    result["train_steps_per_rank"] = [steps for _, steps in rows_steps]
    logger.info(f"best valid: {result['best_valid_result']}")
    logger.info(f"test result: {result['test_result']}")
    return result
