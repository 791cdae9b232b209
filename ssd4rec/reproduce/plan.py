"""Which runs to do, with which settings, and doing them (skip, resume, continue or start).

A task is one (dataset, model, seed). For each, in order:

- a finished record exists (``seed<seed>.json``): skip it;
- its run directory holds ``last.pth`` with ``finished: False`` (the run was killed or
  failed after at least one validation): resume with ``--checkpoint=<run_dir>/last.pth``;
- its ``last.pth`` says ``finished: True`` but no record was written (killed during the
  test evaluation): evaluate ``best.pth`` with ``--checkpoint=<run_dir>/best.pth``;
- otherwise: start a fresh run with ``--run_dir=<run_dir>``.

A run whose training was cut short by ``max_train_seconds`` (``--extra
--max_train_seconds=480``) is a finished run: its ``last.pth`` says ``finished: True``, its
best checkpoint is tested, and its record says ``stopped_by: time_budget``; a rerun skips it.
Every record says why training ended (``stopped_by``: ``early_stopping``, ``time_budget``
or ``epochs``, the last for max epochs reached).

``continue_budgeted=True`` (``scripts/reproduce.py --continue-budgeted``) spreads one run
over several short GPU sessions: a run recorded ``stopped_by: time_budget`` whose ``last.pth``
is still there goes on from it (epoch, patience counter, best score, optimizer) until early
stopping, max epochs or this session's budget, and its record is rewritten for the whole run:
``seconds_per_epoch_all`` holds every session's epochs, and ``earlier_segments`` keeps what
the earlier record said about each earlier session (epochs, best epoch, stopped_by,
time_budget, test, device, kernels, note, finished_at). A run cannot go on without its
``last.pth``, or with other settings than it started with (the time budget, ``data_path``,
``checkpoint_dir`` and ``gpu_id`` may change, and so may ``backend``, ``chunk_size`` and
``compile_glue``, which change how the same function is computed); it is then left as it is,
with a line saying why. Each earlier segment keeps the overrides it ran with. Records of runs that stopped early or at max epochs are never touched.

Datasets whose data is missing and models the framework does not know are recorded in the
store and skipped; any other failure of one run is recorded next to it
(``seed<seed>.error.json``) and the sweep goes on with the next run.
"""

from __future__ import annotations

import datetime
import platform
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ssd4rec.errors import SSD4RecError
from ssd4rec.reproduce.store import ResultStore

REPO_ROOT = Path(__file__).resolve().parents[2]

PAPER_DATASETS = ("ml-1m", "amazon-beauty", "amazon-video-games", "kuairand")
PAPER_MODELS = ("SSD4Rec", "SASRec", "BERT4Rec", "GRU4Rec", "Caser", "Mamba4Rec", "TiM4Rec")
PAPER_SEEDS = (2024, 2025, 2026)
OURS = "SSD4Rec"

# Per-model settings passed as --key=value to every run of that model. They are needed, not
# decorative: config.yaml and datasets/<dataset>.yaml carry SSD4Rec's own keys (hidden_size
# 256, num_layers, dropout_prob, ...), and RecBole merges those into every model's config
# above the model's own defaults; `hidden_size`, `num_layers` and `dropout_prob` are also
# SASRec's / BERT4Rec's / GRU4Rec's / Caser's keys. So every key a baseline reads and that
# the project's YAML files also set is pinned here. RecBole 1.2.1's defaults are used unless
# noted; MAX_ITEM_LIST_LENGTH comes from the dataset's YAML for every model (SSD4Rec reads
# it only with var_len False); training protocol (Adam, lr 1e-3, train_batch_size, early
# stopping on NDCG@10 with patience 10, full ranking, CE loss) is config.yaml's for all.
MODEL_SETTINGS: dict[str, dict] = {
    "SSD4Rec": {},  # config.yaml + datasets/<dataset>.yaml: the official SSD4Rec settings
    "SASRec": {
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE",
    },
    "BERT4Rec": {
        "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE",
        "mask_ratio": 0.2, "ft_ratio": 0.5,  # its own masking (not SSD4Rec's `maskratio`)
    },
    "GRU4Rec": {
        "embedding_size": 64, "hidden_size": 128, "num_layers": 1, "dropout_prob": 0.3,
        "loss_type": "CE",
    },
    "Caser": {
        "embedding_size": 64, "dropout_prob": 0.4, "reg_weight": 1e-4, "nv": 4, "nh": 8,
        "loss_type": "CE",
    },
    # Our other models bring their published settings in ssd4rec/models/<model>.yaml.
    "Mamba4Rec": {},
    "TiM4Rec": {},
}

SETTINGS_SOURCES = {
    "SSD4Rec": "official SSD4Rec settings: config.yaml + datasets/<dataset>.yaml",
    "SASRec": "RecBole 1.2.1 defaults, dropout 0.2/0.2 (hidden/attention) as in Mamba4Rec's baselines",
    "BERT4Rec": "RecBole 1.2.1 defaults (its own mask_ratio 0.2)",
    "GRU4Rec": "RecBole 1.2.1 defaults",
    "Caser": "RecBole 1.2.1 defaults",
    "Mamba4Rec": "published Mamba4Rec config (ssd4rec/models/mamba4rec.yaml)",
    "TiM4Rec": "official TiM4Rec configs (ssd4rec/models/tim4rec.yaml)",
}

# Keys that describe the run, not the model: never compared between a record and a request.
_RUN_KEYS = ("run_dir", "checkpoint")
# Keys a continued run may change between sessions: where the data and GPU are, and how long
# a session is; anything else changed would make one record of two different runs.
_SESSION_KEYS = ("max_train_seconds", "data_path", "checkpoint_dir", "gpu_id")
# Keys that choose how the model's function is computed, not which function: the kernels
# (backend), the scan's chunk size and the compiled glue. Results differ only by rounding, so
# a continued run may change them too (e.g. a faster setting measured after the run began);
# each earlier segment's record keeps the overrides it ran with.
IMPLEMENTATION_KEYS = ("backend", "chunk_size", "compile_glue")
# What a continued run's record keeps of each earlier session's record.
_SEGMENT_KEYS = ("epochs", "best_epoch", "stopped_by", "time_budget", "test", "device",
                 "implementation", "overrides", "note", "finished_at")


@dataclass(frozen=True)
class Task:
    dataset: str
    model: str
    seed: int


def make_tasks(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int]) -> list[Task]:
    """Every (dataset, model, seed), datasets outermost."""
    return [Task(d, m, int(s)) for d in datasets for m in models for s in seeds]


def dataset_max_length(dataset: str, root: Path = REPO_ROOT) -> Optional[int]:
    """MAX_ITEM_LIST_LENGTH of datasets/<dataset>.yaml, or of config.yaml if it sets none."""
    from ssd4rec.config import read_yaml

    path = root / "datasets" / f"{dataset}.yaml"
    values = read_yaml(path) if path.is_file() else {}
    if "MAX_ITEM_LIST_LENGTH" not in values:
        values = read_yaml(root / "config.yaml")
    return values.get("MAX_ITEM_LIST_LENGTH")


def run_overrides(task: Task, *, quick: bool = False, data_path: Optional[str] = None,
                  extra: Optional[dict] = None, root: Path = REPO_ROOT) -> dict:
    """The --key=value settings of one run, in the order they take effect (later wins)."""
    values: dict = {"model": task.model, "dataset": task.dataset, "seed": task.seed,
                    "show_progress": False}
    values.update(MODEL_SETTINGS.get(task.model, {}))
    if task.model in ("SASRec", "BERT4Rec", "GRU4Rec", "Caser"):
        max_len = dataset_max_length(task.dataset, root)
        if max_len is not None:
            values["MAX_ITEM_LIST_LENGTH"] = max_len
    if quick:
        values["epochs"] = 2
    if data_path:
        values["data_path"] = str(data_path)
    values.update(extra or {})
    return values


def to_argv(values: dict) -> list[str]:
    """{'epochs': 2, 'topk': [10, 20]} -> ['--epochs=2', '--topk=[10, 20]'] (YAML values)."""
    import yaml

    def reads_back(text):
        try:
            return yaml.safe_load(text) == text
        except yaml.YAMLError:
            return False

    out = []
    for k, v in values.items():
        if isinstance(v, str) and reads_back(v):
            text = v  # paths and names stay readable
        else:  # numbers, lists, and strings YAML would read as something else ("1", "true")
            text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
            if text.endswith("\n..."):
                text = text[: -len("\n...")]
        out.append(f"--{k}={text}")
    return out


# --------------------------------------------------------------------------------------------
# Availability checks
# --------------------------------------------------------------------------------------------
def check_model(name: str) -> Optional[str]:
    """None if the framework knows the model (ours or RecBole's), else why not."""
    from ssd4rec.run import resolve_model

    try:
        resolve_model(name)
    except SSD4RecError as err:
        return str(err)
    return None


def check_dataset(name: str, data_path: Optional[str] = None, extra: Optional[dict] = None,
                  root: Path = REPO_ROOT) -> Optional[str]:
    """None if the dataset's .inter file exists or can be built here (from raw files, or by
    downloading with --download=True), else the error that says what is missing."""
    from ssd4rec.config import collect_values
    from ssd4rec.data.sources import ensure_dataset

    overrides = {"dataset": name, **(extra or {})}
    if data_path:
        overrides["data_path"] = str(data_path)
    try:
        values, _ = collect_values(root / "config.yaml", root / "datasets", overrides)
        ensure_dataset(name, values.get("data_path") or "datasets/", raw=values.get("raw"),
                       download=bool(values.get("download")), options=values)
    except SSD4RecError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------
# What an implementation record says
# --------------------------------------------------------------------------------------------
def implementation_notes(model: str, device: str, backend: str = "auto") -> dict:
    """Which kernels a run of ``model`` used on ``device`` ("cpu ..." or a GPU name), with the
    config key ``backend`` (SSD4Rec, TiM4Rec; for Mamba4Rec through its _SCAN_BACKEND)."""
    cuda = not str(device).startswith("cpu")
    notes = {}
    if model in ("SSD4Rec", "TiM4Rec", "Mamba4Rec"):
        from ssd4rec.ops.conv1d import _load_cuda_conv1d

        if cuda:
            fn, reason = _load_cuda_conv1d()
            notes["causal_conv1d"] = "cuda (causal_conv1d package)" if fn else f"torch ({reason})"
        else:
            notes["causal_conv1d"] = "torch"
    if model in ("SSD4Rec", "TiM4Rec"):
        from ssd4rec.ops.ssd_scan import _load_triton_heads_scan, _load_triton_scan

        if cuda and backend == "torch":
            notes["ssd_scan"] = "torch (ssd4rec.ops.ssd_scan, chunked; backend: torch)"
        elif cuda and backend == "triton_heads":
            fn, reason = _load_triton_heads_scan()
            notes["ssd_scan"] = ("triton (mamba_ssm's kernels; forward output pass: "
                                 "ssd4rec.ops.ssd_scan_heads)" if fn else f"unavailable ({reason})")
        elif cuda:
            fn, reason = _load_triton_scan()
            notes["ssd_scan"] = "triton (mamba_ssm mamba_chunk_scan_combined)" if fn else f"torch ({reason})"
        else:
            notes["ssd_scan"] = "torch (ssd4rec.ops.ssd_scan, chunked)"
    elif model == "Mamba4Rec":
        from ssd4rec.models.mamba4rec import _SCAN_BACKEND
        from ssd4rec.ops.selective_scan import selective_scan_implementation

        notes["selective_scan"] = selective_scan_implementation("cuda" if cuda else "cpu",
                                                                _SCAN_BACKEND.get(backend, "auto"))
    else:
        import recbole

        notes["model"] = f"RecBole {recbole.__version__} {model}"
    return notes


def _versions() -> dict:
    import recbole
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "recbole": recbole.__version__}


# --------------------------------------------------------------------------------------------
# Doing the runs
# --------------------------------------------------------------------------------------------
def _read_checkpoint(path: Path) -> Optional[dict]:
    """The run state in a checkpoint (without weights), or None if unreadable."""
    from ssd4rec.trainer import load_checkpoint

    try:
        state = load_checkpoint(path)
    except SSD4RecError:
        return None
    info = {k: state.get(k) for k in ("epoch", "finished", "model", "stopped_by", "time_budget")}
    info["training_state"] = "optimizer" in state  # best.pth holds weights only
    return info


def _session_free(values: Optional[dict]) -> dict:
    """The settings that must match for a run to go on: all but _SESSION_KEYS and
    IMPLEMENTATION_KEYS."""
    return {k: v for k, v in (values or {}).items() if k not in _SESSION_KEYS + IMPLEMENTATION_KEYS}


def budget_continuation(task: Task, store: ResultStore, record: dict,
                        overrides: Optional[dict]) -> tuple[Optional[dict], Optional[str]]:
    """For a run the time budget stopped: (its last.pth's run state, None) when training can go
    on from there with ``overrides`` (the settings asked for now, without _RUN_KEYS), else
    (None, why not). Starting it over instead would throw away the sessions already spent."""
    path = store.run_dir(task.dataset, task.model, task.seed) / "last.pth"
    if not path.is_file():
        return None, f"{path} is missing"
    last = _read_checkpoint(path)
    if last is None:
        return None, f"{path} cannot be read"
    if last.get("model") != task.model or not last.get("training_state"):
        return None, f"{path} holds no training state of {task.model}"
    if _session_free(record.get("overrides")) != _session_free(overrides):
        return None, f"it ran with other settings ({record.get('overrides')})"
    return last, None


def _reopen(path: Path) -> None:
    """Mark last.pth unfinished again: ssd4rec.run resumes only from an unfinished last.pth
    (a finished one is evaluated). Its fit marks it finished again when training ends."""
    from ssd4rec.trainer import atomic_save, load_checkpoint

    state = load_checkpoint(path)
    state["finished"] = False
    state.pop("stopped_by", None)  # they said why training had ended; it goes on now
    state.pop("time_budget", None)
    atomic_save(state, path)


def task_state(task: Task, store: ResultStore, *, continue_budgeted: bool = False,
               overrides: Optional[dict] = None) -> tuple[str, Optional[dict]]:
    """("done", record) | ("continue", last) | ("resume", last) | ("evaluate", last) |
    ("new", None). "continue" only with continue_budgeted, for a record stopped by the time
    budget that budget_continuation accepts with ``overrides``."""
    record = store.load_run(task.dataset, task.model, task.seed)
    if record is not None:
        if continue_budgeted and record.get("stopped_by") == "time_budget":
            last, _ = budget_continuation(task, store, record, overrides)
            if last is not None:
                return "continue", last
        return "done", record
    last_path = store.run_dir(task.dataset, task.model, task.seed) / "last.pth"
    best_path = last_path.with_name("best.pth")
    last = _read_checkpoint(last_path) if last_path.is_file() else None
    if last is not None and last.get("model") == task.model:
        if not last.get("finished"):
            return "resume", last
        if best_path.is_file():
            return "evaluate", last
    return "new", None


def run_task(task: Task, store: ResultStore, run_fn: Callable[[list], dict], *,
             quick: bool = False, data_path: Optional[str] = None, extra: Optional[dict] = None,
             note: Optional[str] = None, continue_budgeted: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Run (or resume, continue, or finish) one task and write its record. Returns the record.
    note: free text kept in the record and shown in the report (e.g. how the GPU was shared).
    continue_budgeted: go on with a run the time budget stopped (see the module's docstring)."""
    values = run_overrides(task, quick=quick, data_path=data_path, extra=extra)
    wanted = {k: v for k, v in values.items() if k not in _RUN_KEYS}
    state, info = task_state(task, store, continue_budgeted=continue_budgeted, overrides=wanted)
    if state == "done":
        return info
    run_dir = store.run_dir(task.dataset, task.model, task.seed)
    argv = to_argv(values)
    start_epoch = 0
    earlier = None  # the record of the sessions before this one, when continuing
    if state in ("resume", "continue"):
        start_epoch = int(info["epoch"]) + 1
        if state == "continue":
            earlier = store.load_run(task.dataset, task.model, task.seed)
            _reopen(run_dir / "last.pth")
        argv.append(f"--checkpoint={run_dir / 'last.pth'}")
        log(f"[{state}] {task.dataset} {task.model} seed {task.seed} from epoch {start_epoch}")
    elif state == "evaluate":
        argv.append(f"--checkpoint={run_dir / 'best.pth'}")
        log(f"[finish] {task.dataset} {task.model} seed {task.seed}: training had finished; "
            "evaluating best.pth")
    else:
        argv.append(f"--run_dir={run_dir}")
        log(f"[run]    {task.dataset} {task.model} seed {task.seed}")

    result = run_fn(argv)

    last = _read_checkpoint(run_dir / "last.pth")
    best = _read_checkpoint(run_dir / "best.pth")
    epochs_here = int(result.get("epochs_run") or 0)
    if last is not None and last.get("epoch") is not None:
        epochs = int(last["epoch"]) + 1  # epochs are 0-based; last.pth has the last one run
    else:
        epochs = start_epoch + epochs_here
    seconds = [float(s) for s in result.get("seconds_per_epoch") or []]
    segments = None
    if earlier is not None:
        seconds = [float(s) for s in earlier.get("seconds_per_epoch_all") or []] + seconds
        segments = list(earlier.get("earlier_segments") or [])
        segments.append({k: earlier.get(k) for k in _SEGMENT_KEYS})
    device = result.get("device", "unknown")
    # Why training ended: from this process's fit, or, when it only evaluated a run whose
    # training had finished, from that run's last.pth (None for checkpoints older than the
    # field).
    stopped_by = result.get("stopped_by") or (last or {}).get("stopped_by")
    record = {
        "dataset": task.dataset,
        "model": task.model,
        "seed": task.seed,
        "status": "finished",
        "test": result.get("test_result", {}),
        "valid": result.get("best_valid_result", {}),
        "epochs": epochs,
        "best_epoch": None if best is None or best.get("epoch") is None else int(best["epoch"]) + 1,
        "stopped_by": stopped_by,  # "early_stopping" | "time_budget" | "epochs" (max epochs reached)
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        # The epochs timed: those of the last process, after those of earlier sessions when
        # continued (a run killed and resumed loses the killed process's times).
        "seconds_per_epoch_all": seconds,
        "resumed_from_epoch": start_epoch if state in ("resume", "continue") else None,
        "evaluated_only": state == "evaluate",
        "device": device,
        "implementation": implementation_notes(task.model, device, values.get("backend") or "auto"),
        "overrides": {k: v for k, v in values.items() if k not in _RUN_KEYS},
        "argv": argv,
        "checkpoint": result.get("checkpoint"),
        "quick": quick,
        "versions": _versions(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if stopped_by == "time_budget":
        record["time_budget"] = result.get("time_budget") or (last or {}).get("time_budget")
    if note:
        record["note"] = note
    if segments is not None:
        record["earlier_segments"] = segments  # oldest first; the last one is the record replaced
    store.save_run(record)
    return record


def execute(datasets: Iterable[str], models: Iterable[str], seeds: Iterable[int],
            store: ResultStore, run_fn: Callable[[list], dict], *, quick: bool = False,
            data_path: Optional[str] = None, extra: Optional[dict] = None,
            model_check: Callable[[str], Optional[str]] = check_model,
            dataset_check: Optional[Callable[[str], Optional[str]]] = None,
            note: Optional[str] = None, continue_budgeted: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Every task, datasets outermost. Returns counts and the failures:
    {"done": [...], "ran": [...], "failed": [(task, error)], "skipped": [(what, why)]}.
    continue_budgeted: go on with runs the time budget stopped; they count as "ran"."""
    if dataset_check is None:
        def dataset_check(name):
            return check_dataset(name, data_path, extra)

    datasets, models, seeds = list(datasets), list(models), [int(s) for s in seeds]
    summary = {"done": [], "ran": [], "failed": [], "skipped": []}
    model_errors = {m: model_check(m) for m in models}
    for dataset in datasets:
        error = dataset_check(dataset)
        if error is not None:
            store.mark_dataset_unavailable(dataset, error)
            summary["skipped"].append((dataset, "data not available here"))
            log(f"[skip]   {dataset}: data not available here: {error.splitlines()[0]}")
            continue
        store.clear_dataset_unavailable(dataset)
        for model in models:
            if model_errors[model] is not None:
                store.mark_model_unavailable(dataset, model, model_errors[model])
                summary["skipped"].append((f"{dataset}/{model}", "model not available here"))
                log(f"[skip]   {dataset} {model}: {model_errors[model]}")
                continue
            store.clear_model_unavailable(dataset, model)
            if model not in MODEL_SETTINGS:
                log(f"[note]   {model} has no entry in MODEL_SETTINGS: it runs with config.yaml "
                    "and the dataset YAML's values for any keys it shares with SSD4Rec")
            for seed in seeds:
                task = Task(dataset, model, seed)
                record = store.load_run(dataset, model, seed)
                wanted = run_overrides(task, quick=quick, data_path=data_path, extra=extra)
                wanted = {k: v for k, v in wanted.items() if k not in _RUN_KEYS}
                budgeted = record is not None and record.get("stopped_by") == "time_budget"
                why_not = None
                if budgeted and continue_budgeted:
                    why_not = budget_continuation(task, store, record, wanted)[1]
                continues = budgeted and continue_budgeted and why_not is None
                if record is not None and not continues:
                    summary["done"].append(task)
                    budget = " (stopped by the time budget)" if budgeted else ""
                    log(f"[done]   {dataset} {model} seed {seed}{budget}")
                    if why_not is not None:
                        log(f"[note]   {dataset} {model} seed {seed} cannot be continued because "
                            f"{why_not}; deleting its record "
                            f"({store.run_path(dataset, model, seed)}) starts it again")
                    elif record.get("overrides") != wanted:
                        log(f"[note]   {dataset} {model} seed {seed} finished with other settings "
                            f"({record.get('overrides')}); delete its record to run it again")
                    continue
                try:
                    run_task(task, store, run_fn, quick=quick, data_path=data_path,
                             extra=extra, note=note, continue_budgeted=continue_budgeted, log=log)
                except Exception as err:  # one failed run must not stop the sweep
                    text = "".join(traceback.format_exception_only(type(err), err)).strip()
                    store.record_error(dataset, model, seed, text)
                    summary["failed"].append((task, text))
                    log(f"[fail]   {dataset} {model} seed {seed}: {text.splitlines()[-1]}")
                else:
                    summary["ran"].append(task)
    return summary
