"""RecBole's Trainer with checkpoints that are safe to load and a run that resumes.

RecBole 1.2.1 pickles its whole ``Config`` object into checkpoints, which
``torch.load`` refuses by default since torch 2.6. Ours hold only tensors and
plain values, load with ``weights_only=True``, and are written to a temporary file
then renamed, so a crash never leaves half a checkpoint.

A run directory holds two files:
  best.pth  the weights of the best validation epoch (what test metrics use)
  last.pth  the full training state after the latest validation, for resuming: weights,
            optimizer, early-stopping counters and every rank's RNG states (see rng_state)

The training loop (``sync_free_step: True``, the default) is RecBole's without its two
device-to-host reads per step (``loss.item()`` and the NaN check): the loss is summed on
the device and read once per epoch, and each batch is copied to the device one batch
ahead (see ``prefetch``). ``sync_free_step: False`` runs RecBole's own loop.

``max_train_seconds`` (a wall-clock budget for ``fit``): before each epoch, once this
process has trained and validated at least one, training stops if the time spent in ``fit``
plus the time the latest epoch took (training, validation and checkpoints, measured) would
pass the budget. The run then ends as a finished one (``last.pth`` says ``finished: True``), its
best checkpoint is tested as usual, and ``stopped_by`` says why training ended.
"""

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import EvaluatorType, get_gpu_usage, init_seed, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from ssd4rec import distributed
from ssd4rec.data.bert4rec_masking import masking_generator_state, set_masking_generator_state
from ssd4rec.data.packing import HOST_TOTAL_TOKENS
from ssd4rec.data.sampled_eval import score_sampled_rows
from ssd4rec.errors import SSD4RecError
from ssd4rec.models import MODELS


# graph_step when the key is absent, as config.yaml: on where it can be (ssd4rec.graph_step).
GRAPH_STEP = "auto"


def plain_values(config):
    """The config's values that are plain Python data (what weights_only accepts)."""

    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if isinstance(value, (list, tuple)):
            items = [plain(v) for v in value]
            return None if any(i is _SKIP for i in items) else items
        if isinstance(value, dict):
            items = {str(k): plain(v) for k, v in value.items()}
            return None if any(i is _SKIP for i in items.values()) else items
        return _SKIP

    values = {}
    for key, value in config.final_config_dict.items():
        converted = plain(value)
        if converted is not _SKIP:
            values[key] = converted
    return values


_SKIP = object()

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


def atomic_save(obj, path):
    """torch.save through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by this trainer; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SSD4RecError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise SSD4RecError(
            f"checkpoint {path} could not be read as an ssd4rec checkpoint "
            f"(it must load with torch.load(weights_only=True)): {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "state_dict", "config"} <= checkpoint.keys():
        raise SSD4RecError(f"checkpoint {path} is not an ssd4rec checkpoint (no model/state_dict/config)")
    return checkpoint


def load_weights(model, checkpoint, path):
    """Load a checkpoint's weights into model; mismatches name the checkpoint."""
    expected = type(model).__name__
    if checkpoint["model"] != expected:
        raise SSD4RecError(
            f"checkpoint {path} was saved by model {checkpoint['model']!r}, but the model is {expected!r}"
        )
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise SSD4RecError(
            f"checkpoint {path} does not fit this {expected} configuration: {str(err).splitlines()[1:3]}"
        ) from None


def to_device(interaction, device, length_field=None):
    """An interaction batch on ``device``; on CUDA copied from pinned memory without
    blocking the host (the copy runs in stream order before the kernels that read it).

    length_field: the field of history lengths; when the batch has it on the CPU, its sum
    is taken there, before the copy, and set as the moved batch's ``HOST_TOTAL_TOKENS``
    (ssd4rec.data.packing), so that packing the batch reads nothing back from the device.
    """
    total_tokens = None
    if length_field is not None and length_field in interaction:
        lengths = interaction[length_field]
        if lengths.device.type == "cpu":
            total_tokens = int(lengths.sum())
    if device.type == "cuda":
        moved = Interaction({
            key: (value.pin_memory() if value.device.type == "cpu" else value).to(device, non_blocking=True)
            for key, value in interaction.interaction.items()
        })
    else:
        moved = interaction.to(device)
    if total_tokens is not None:
        setattr(moved, HOST_TOTAL_TOKENS, total_tokens)
    return moved


def prefetch(batches, device, length_field=None):
    """The batches on ``device``, each one's copy queued before the previous one is handed
    out: while the training step of batch k is queued and runs, batch k + 1 is already on
    its way (see to_device)."""
    iterator = iter(batches)
    try:
        ahead = to_device(next(iterator), device, length_field)
    except StopIteration:
        return
    for batch in iterator:
        current, ahead = ahead, to_device(batch, device, length_field)
        yield current
    yield ahead


def _loader_rng_state(loader):
    generator = getattr(loader, "generator", None)
    transform = getattr(loader, "transform", None)
    return {
        "generator": None if generator is None else generator.get_state(),
        "masking": None if transform is None else masking_generator_state(transform),
    }


def _set_loader_rng_state(loader, state):
    generator = getattr(loader, "generator", None)
    if generator is not None and state["generator"] is not None:
        # In place: the loader's RandomSampler holds this very object (a new Generator
        # assigned to loader.generator would not reach it).
        generator.set_state(state["generator"].cpu())
    transform = getattr(loader, "transform", None)
    if transform is not None:
        masking = state["masking"]
        set_masking_generator_state(transform, None if masking is None else masking.cpu())


def rng_state(train_data, valid_data=None):
    """Every random stream that training draws from, as values torch.load(weights_only=True)
    accepts (tensors, lists, ints, floats, None).

    A resumed process starts from RecBole's init_seed, as the run did at epoch 0: without
    these, the epochs after a resume replay the shuffles and dropout masks of epochs 0, 1, ...

    Each RecBole loader has its own ``generator`` (seeded with config["seed"] when it is built):
    the training loader's RandomSampler draws each epoch's permutation from it, and every
    loader's iterator the base seed of its workers. A masking transform (BERT4Rec; every loader
    has one) keeps its own generator, created at its first batch from Python's ``random``: the
    validation loader's is saved too, or a resumed run would create it again and shift
    ``random`` by one draw.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        # numpy's state is a tuple holding an ndarray, which weights_only refuses.
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        # Untouched until initialised; reading it would initialise CUDA on a CPU run.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "train": _loader_rng_state(train_data),
        "valid": _loader_rng_state(valid_data),
    }


def set_rng_state(state, train_data, valid_data=None):
    """Put back what rng_state saved (tensors may come on the checkpoint's map_location)."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    _set_loader_rng_state(train_data, state["train"])
    _set_loader_rng_state(valid_data, state["valid"])


def reseed_rngs(seed, epoch, rank, train_data, reproducibility):
    """Seed the global streams and the training loader's from (seed, epoch, rank): for a
    checkpoint without usable RNG states, so that the resumed epochs at least draw other
    numbers than epochs 0, 1, ... (validation draws nothing that its metrics depend on).
    The global streams go through RecBole's init_seed, as at the run's start."""
    value = int(np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(rank)]).generate_state(1)[0])
    init_seed(value, reproducibility)
    generator = getattr(train_data, "generator", None)
    if generator is not None:
        generator.manual_seed(value)
    transform = getattr(train_data, "transform", None)
    if transform is not None:
        set_masking_generator_state(transform, None)  # seeded again from `random` at its next batch


class _TimeBudgetSpent(Exception):
    """Raised by _train_epoch before an epoch that would end past max_train_seconds;
    caught by fit, which then returns as RecBole's fit returns."""


STOP_REASONS = ("early_stopping", "time_budget", "epochs")


@dataclass
class FitClock:
    """What the time budget reads during one fit: when it started, the epochs begun and the
    validations done in this process, and whether epochs are validated at all."""

    start: float
    validates: bool
    epochs: int = 0
    validations: int = 0
    latest_epoch_start: Optional[float] = None  # perf_counter() when the latest epoch began


class Trainer(RecBoleTrainer):
    """RecBole's training loop and evaluator with weights-only checkpoints in ``run_dir``."""

    def __init__(self, config, model, run_dir):
        several = not config["single_spec"]
        self.graph_step = self._graph_step_wanted(config, model, several)  # read by _build_optimizer
        # RecBole's AbstractTrainer would wrap the model in DDP itself, with options that
        # break here (ssd4rec.distributed.wrap_model says which): build a one-process
        # trainer, then wrap the model our way.
        if several:
            model = distributed.sync_batchnorm(model, config["device"])
        config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not several
        # Graphed steps with a process group average their gradients in one flat buffer
        # (ssd4rec.gradient_sync says why DDP's reducer cannot serve them); None otherwise.
        # A one-process run has no group; the GPU tests start one of size 1.
        self.flat_gradients = None
        if self.graph_step and torch.distributed.is_initialized():
            from ssd4rec.gradient_sync import FlatGradients, broadcast_module

            broadcast_module(model)
            self.flat_gradients = FlatGradients(model.parameters())
        elif several:
            self.distributed_model = distributed.wrap_model(model, config["device"])
        if several:
            self.eval_collector = distributed.ShardCollector(config)
            if not distributed.is_main_process():
                self.tensorboard = distributed.silence_tensorboard(self.tensorboard)
        self.run_dir = Path(run_dir)
        self.saved_model_file = str(self.run_dir / "best.pth")
        self.last_file = self.run_dir / "last.pth"
        self.config_values = plain_values(config)
        self.epoch_seconds = []  # wall time of each training epoch run by this process
        self.rows_trained = self.steps_trained = 0  # by this process (its shard, with several)
        # RecBole's own AMP switch autocasts to float16; `amp: bf16` autocasts the
        # loss computation to bfloat16 instead (no GradScaler needed).
        self.amp_dtype = AMP_DTYPES[config["amp"] or "none"] if "amp" in config else None
        # True: our training loop, which reads nothing back from the device inside a step;
        # False: RecBole's own (two device-to-host reads per step). See _sync_free_epoch.
        self.sync_free_step = config["sync_free_step"] if "sync_free_step" in config else True
        if self.sync_free_step is None:
            self.sync_free_step = True
        self._hook_input = None
        # `graph_step: True`: training steps replayed from CUDA graphs (ssd4rec.graph_step);
        # None when off. The optimizer is built capturable for it (_build_optimizer).
        self.graphed_steps = self._graphed_steps(model)
        # Wall-clock budget of fit (None: no limit); see _time_budget_spent.
        self.max_train_seconds = config["max_train_seconds"] if "max_train_seconds" in config else None
        # Why the last fit ended: one of STOP_REASONS (None before fit); for "time_budget",
        # stopped_by_time_budget = {"after_epoch", "elapsed_s", "max_train_seconds", ...}.
        self.stopped_by = None
        self.stopped_by_time_budget = None
        self._fit_clock = None  # a FitClock during fit
        self._loaders = (None, None)  # fit's (train, valid), whose RNG states last.pth saves
        # Set by resume_checkpoint, used by fit: the RNG states are restored there, where the
        # training loader (built before the trainer resumes) is at hand.
        self._resume_rng = None

    @staticmethod
    def _graph_step_wanted(config, model, several):
        """graph_step's value resolved against this run: True, False, or an error naming why
        it cannot be had (auto: on where it can be)."""
        value = config["graph_step"] if "graph_step" in config else GRAPH_STEP
        if value is None or value is False:
            return False
        if value == "auto" and several:
            # Graphed steps on several processes (their gradients averaged by
            # ssd4rec.gradient_sync) have run on one GPU in a group of one, not yet on
            # several GPUs: auto leaves them to an explicit graph_step: True.
            return False
        learner = config["learner"] if "learner" in config else "adam"
        obstacles = [
            (torch.device(config["device"]).type != "cuda", "a CUDA device"),
            (config["sync_free_step"] is False if "sync_free_step" in config else False, "sync_free_step: True"),
            (bool(config["enable_amp"] or config["enable_scaler"]) if "enable_amp" in config else False,
             "RecBole's fp16 AMP off (use amp: bf16)"),
            (str(learner).lower() not in ("adam", "adamw"), "learner adam or adamw (a capturable fused optimizer)"),
            (not hasattr(model, "padding_row"), "a model that pads its batches (SSD4Rec)"),
        ]
        missing = [need for blocked, need in obstacles if blocked]
        if not missing:
            return True
        if value == "auto":
            return False
        raise SSD4RecError(f"config key 'graph_step': True needs {', '.join(missing)}")

    def _graphed_steps(self, model):
        if not self.graph_step:
            return None
        from ssd4rec.graph_step import GraphedSteps

        # With several processes RecBole's loaders give each rank train_batch_size / N rows.
        rows = self.config["train_batch_size"] // distributed.world_size()
        return GraphedSteps(model, self.optimizer, amp_dtype=self.amp_dtype, clip_grad_norm=self.clip_grad_norm,
                            rows=rows, gradients=self.flat_gradients)

    def _build_optimizer(self, **kwargs):
        """RecBole's optimizer, except Adam and AdamW on a CUDA device: their fused kernels (one
        launch for all parameters, where the default foreach path makes a dozen), the same update
        rule. The H100 profile of session 17 had the foreach Adam at 0.85 ms of a 24 ms step."""
        learner = kwargs.get("learner", self.learner).lower()
        if learner not in ("adam", "adamw") or torch.device(self.config["device"]).type != "cuda":
            return super()._build_optimizer(**kwargs)
        kind = torch.optim.Adam if learner == "adam" else torch.optim.AdamW
        # Capturable (the step count on the device) when the step is captured in CUDA graphs.
        return kind(kwargs.get("params", self.model.parameters()), lr=kwargs.get("learning_rate", self.learning_rate),
                    weight_decay=kwargs.get("weight_decay", self.weight_decay), fused=True,
                    capturable=self.graph_step)

    def _time_budget_spent(self, epoch_idx):
        """True if the epoch about to start would end past max_train_seconds.

        Counted from the start of this process's fit. The next epoch is taken to last as long
        as the latest one (with its validation and checkpoints), not the mean so far: a
        process's first epoch also pays for compiling and autotuning the Triton kernels (2 to
        5 minutes on an H100), and with the mean a short GPU session gave up an epoch that
        would have fitted (ML-1M: 593 s spent of 674, the mean 85 s, the latest 62 s). It
        needs one epoch trained and validated here (trained, when nothing is validated).
        With several processes every rank decides on the largest elapsed and latest-epoch
        times of all ranks, so that all stop before the same epoch."""
        if self.max_train_seconds is None or self._fit_clock is None:
            return False
        clock = self._fit_clock
        if clock.epochs == 0 or (clock.validates and not clock.validations):
            return False
        now = time.perf_counter()
        latest = now - clock.latest_epoch_start if clock.latest_epoch_start is not None else None
        per_rank = distributed.gather((now - clock.start, latest))
        elapsed = max(spent for spent, _ in per_rank)
        mean_epoch = elapsed / clock.epochs
        next_epoch = mean_epoch if latest is None else max(took for _, took in per_rank)
        if elapsed + next_epoch <= self.max_train_seconds:
            return False
        self.stopped_by_time_budget = {
            "after_epoch": epoch_idx,  # epochs trained in all (1-based number of the last one)
            "elapsed_s": round(elapsed, 3),
            "max_train_seconds": self.max_train_seconds,
            "mean_epoch_s": round(mean_epoch, 3),
            "next_epoch_s": round(next_epoch, 3),  # the estimate the decision used
            "epochs_this_process": clock.epochs,
        }
        return True

    def _autocast_loss(self, interaction):
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
            return self.model.calculate_loss(interaction)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._time_budget_spent(epoch_idx):
            raise _TimeBudgetSpent
        if self._fit_clock is not None:
            self._fit_clock.epochs += 1
            self._fit_clock.latest_epoch_start = time.perf_counter()
        # The CUDA graphs capture the model's own loss, so they serve the default loss only.
        graphs = self.graphed_steps if loss_func is None else None
        if self.amp_dtype is not None and loss_func is None:
            loss_func = self._autocast_loss
        compute_loss = loss_func or self.model.calculate_loss

        def counted_loss(interaction):
            self.rows_trained += len(interaction)
            self.steps_trained += 1
            return compute_loss(interaction)

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        if self.sync_free_step:
            loss = self._sync_free_epoch(train_data, epoch_idx, counted_loss, show_progress, graphs)
        else:
            loss = super()._train_epoch(train_data, epoch_idx, counted_loss, show_progress)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.epoch_seconds.append(time.perf_counter() - start)
        # With several processes, log the mean over ranks: the sum over steps of the
        # global batch's mean loss, as one process would report it.
        return distributed.mean_over_ranks(loss, self.device)

    def _sync_free_epoch(self, train_data, epoch_idx, loss_func, show_progress=False, graphs=None):
        """RecBole's Trainer._train_epoch, with one device-to-host read per epoch.

        The same steps in the same order (set_epoch, reduce hook, fp16 autocast and grad
        scaler when RecBole's enable_amp / enable_scaler ask for them, gradient clipping),
        and the same result: the sum of the batches' losses as a float, or a tuple of sums
        for a model whose loss is a tuple. The sum is kept on the device and read once at
        the end, where a NaN is reported (RecBole checks every step; here the epoch's
        remaining steps have run by then).
        """
        self.model.train()
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        batches = prefetch(train_data, self.device, getattr(self.model, "ITEM_SEQ_LEN", None))
        if show_progress:
            batches = tqdm(batches, total=len(train_data), ncols=100,
                           desc=set_color(f"Train {epoch_idx:>5}", "pink"))
        total = self._train_steps(batches, loss_func, show_progress, graphs)
        if total is None:
            return None
        sums = total.tolist()  # the epoch's one device-to-host read: a float, or a list for tuple losses
        if any(math.isnan(value) for value in (sums if isinstance(sums, list) else [sums])):
            raise ValueError(f"Training loss is nan (epoch {epoch_idx})")
        return tuple(sums) if isinstance(sums, list) else sums

    def _train_steps(self, batches, loss_func, show_progress=False, graphs=None):
        """One training step per batch (already on the device); returns the detached sum of
        their losses on the device, float64: () for a loss, (parts,) for a tuple of losses;
        None for no batches. Nothing here waits for the device, except RecBole's fp16 grad
        scaler (enable_scaler), whose step reads its overflow check back.

        graphs: a GraphedSteps (ssd4rec.graph_step), which takes the batches it can and
        leaves the rest to the eager step here (counted in rows_trained and steps_trained
        either way)."""
        flat = self.flat_gradients  # graphed steps' gradient averaging; None: DDP's reducer (or one process)
        ddp = not self.config["single_spec"] and flat is None
        scaler = torch.amp.GradScaler("cuda", enabled=self.enable_scaler)
        total = None
        if graphs is not None:
            graphs.begin_epoch()
        graphed = False
        for interaction in batches:
            if graphs is not None and graphs.step(interaction):
                self.rows_trained += len(interaction)
                self.steps_trained += 1
                graphed = True
                continue
            if flat is None:
                self.optimizer.zero_grad()
            else:
                flat.zero_()
            sync_loss = 0
            if ddp:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                losses = loss_func(interaction)
            # Each loss is one value (RecBole reads it with .item()), of any shape: ()/(1,)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = torch.stack([part.detach().to(torch.float64).reshape(()) for part in losses])
            else:
                loss = losses
                parts = losses.detach().to(torch.float64).reshape(())
            total = parts if total is None else total + parts
            scaler.scale(loss + sync_loss).backward()
            if flat is not None:
                flat.average_()  # the one all-reduce a graphed step also makes
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            scaler.step(self.optimizer)
            scaler.update()
            # A live loss keeps its autograd graph's nodes, and with them the parameters'
            # gradient accumulators and the stream they were made on: a CUDA graph captured
            # next would have to wait on that stream, which capture forbids.
            loss = losses = None
            if self.gpu_available and show_progress:
                batches.set_postfix_str(set_color("GPU RAM: " + get_gpu_usage(self.device), "yellow"))
        if graphed:
            total = graphs.loss_sum.clone() if total is None else total + graphs.loss_sum
        return total

    def set_reduce_hook(self):
        """RecBole's, with its dummy input made on the device once: RecBole copies
        ``LongTensor([0])`` from the host every step, a synchronising copy on CUDA."""
        if self._hook_input is None:
            self._hook_input = torch.zeros(1, dtype=torch.long, device=self.device)
        forward = self.model.forward
        self.model.forward = lambda x: x
        try:
            self.distributed_model(self._hook_input)
        finally:
            self.model.forward = forward

    def _state(self, epoch, with_training_state):
        state = {
            "model": type(self.model).__name__,
            "config": self.config_values,
            "epoch": epoch,
            "state_dict": self.model.state_dict(),
        }
        if with_training_state:
            state.update(
                cur_step=self.cur_step,
                best_valid_score=float(self.best_valid_score),
                best_valid_result={k: float(v) for k, v in (self.best_valid_result or {}).items()},
                optimizer=self.optimizer.state_dict(),
                finished=False,
            )
        return state

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole calls this when validation improves: the best weights."""
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        if not distributed.is_main_process():
            return
        atomic_save(self._state(epoch, with_training_state=False), path)
        if verbose:
            self.logger.info(f"Saving best: {path}")

    def _save_last(self, epoch, valid_score=None):
        # A collective: every rank's streams go to the main process, the only one writing.
        rng = distributed.gather(rng_state(*self._loaders))
        if not distributed.is_main_process():
            return
        state = self._state(epoch, with_training_state=True)
        state["rng"] = rng  # one entry per rank
        atomic_save(state, self.last_file)

    def _restore_rng(self, train_data, valid_data, states, resume_file):
        """Each rank its own entry of last.pth's RNG states; failing that, every stream
        reseeded from (seed, start epoch, rank), with a warning."""
        rank, world = distributed.rank(), distributed.world_size()
        if states is not None and len(states) == world:
            set_rng_state(states[rank], train_data, valid_data)
            return
        if states is None:
            why = "holds no RNG states (written before last.pth saved them)"
        else:
            why = f"holds the RNG states of {len(states)} processes, this run has {world}"
        self.logger.warning(
            f"{resume_file} {why}: every RNG is reseeded from (seed {self.config['seed']}, "
            f"epoch {self.start_epoch}, rank {rank}). The resumed epochs do not replay the shuffles "
            f"and dropout masks of the first ones, but they are not those of an uninterrupted run."
        )
        reseed_rngs(self.config["seed"], self.start_epoch, rank, train_data, self.config["reproducibility"])

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's fit, with last.pth after every validation, the max_train_seconds budget,
        and ``self.stopped_by`` set to why training ended."""
        early_stopped = False

        def after_validation(epoch, valid_score):
            nonlocal early_stopped
            self._fit_clock.validations += 1
            # RecBole's early_stopping has just updated cur_step; it stops past stopping_step.
            early_stopped = self.cur_step > self.stopping_step
            if saved:
                self._save_last(epoch)
            if callback_fn:
                callback_fn(epoch, valid_score)

        self.stopped_by = self.stopped_by_time_budget = None
        self._loaders = (train_data, valid_data)
        if self._resume_rng is not None:
            self._restore_rng(train_data, valid_data, **self._resume_rng)
            self._resume_rng = None
        validates = self.eval_step > 0 and bool(valid_data)
        self._fit_clock = FitClock(start=time.perf_counter(), validates=validates)
        try:
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, after_validation)
            self.stopped_by = "early_stopping" if early_stopped else "epochs"
        except _TimeBudgetSpent:
            self.stopped_by = "time_budget"
            budget = self.stopped_by_time_budget
            if verbose:
                self.logger.info(
                    f"Stopped by the time budget after epoch {budget['after_epoch']}: "
                    f"{budget['elapsed_s']:.1f} s spent, another epoch of {budget['next_epoch_s']:.1f} s "
                    f"would pass max_train_seconds = {budget['max_train_seconds']}"
                )
            self._add_hparam_to_tensorboard(self.best_valid_score)
            result = self.best_valid_score, self.best_valid_result
        finally:
            self._fit_clock = None
            self._loaders = (None, None)
        if saved and distributed.is_main_process() and self.last_file.exists():
            # Finished, whatever stopped it: a rerun evaluates best.pth rather than resuming.
            state = load_checkpoint(self.last_file)
            state["finished"] = True
            state["stopped_by"] = self.stopped_by
            state["time_budget"] = self.stopped_by_time_budget
            atomic_save(state, self.last_file)
        return result

    def resume_checkpoint(self, resume_file):
        """Continue an unfinished run from its last.pth (same run directory). Its RNG states
        are put back when fit starts (see _restore_rng)."""
        checkpoint = load_checkpoint(resume_file, map_location=self.device)
        if "optimizer" not in checkpoint:
            raise SSD4RecError(f"checkpoint {resume_file} holds weights only; resume from the run's last.pth")
        load_weights(self.model, checkpoint, resume_file)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.best_valid_result = checkpoint["best_valid_result"]
        self._resume_rng = {"states": checkpoint.get("rng"), "resume_file": resume_file}
        self.logger.info(f"Resuming from {resume_file} at epoch {self.start_epoch}")

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model:
            distributed.barrier()  # rank 0 may still be writing the file
            path = model_file or self.saved_model_file
            load_weights(self.model, load_checkpoint(path, map_location=self.device), path)
            self.logger.info(f"Loaded weights from {path}")
        if eval_data and isinstance(self.eval_collector, distributed.ShardCollector):
            self.eval_collector.set_shard(eval_data.sampler)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def _neg_sample_batch_eval(self, batched_data):
        """Score a sampled-evaluation batch (``mode: uniN``) encoding each user's history once.

        RecBole calls ``model.predict`` on the batch as ``NegSampleEvalDataLoader`` builds
        it: each user's row repeated N + 1 times (the target, then N negatives) with only
        the item id changed, so under ``uni1000`` every history is encoded 1,001 times for
        1,001 dot products. ``score_sampled_rows`` encodes it once (one ``full_sort_predict``
        row per user) and picks the candidates' scores from that row. The result is laid
        out as RecBole lays it out: a (users in the batch, items) matrix of -inf, filled at
        [row_idx, candidate item].

        RecBole's method is used instead where that shortcut is not known to give
        ``predict``'s scores: value (not ranking) evaluation, a model that is not one of
        ssd4rec's (``score_sampled_rows`` is only valid for models whose ``predict`` equals
        their ``full_sort_predict`` at the candidate, which RecBole does not promise for its
        own) or that has no ``full_sort_predict``, and batches in which a user has several
        evaluated rows (their histories differ, and one row per user would score them all
        with the first).
        """
        interaction, row_idx, positive_u, positive_i = batched_data
        # The bare module, as RecBole's method and the rest of this trainer use it: with
        # several processes the DDP wrapper is self.distributed_model, used for training
        # steps only, and evaluation needs no gradient synchronisation.
        model = self.model
        if (
            self.config["eval_type"] != EvaluatorType.RANKING
            or row_idx is None
            or not isinstance(model, tuple(MODELS.values()))
            or type(model).full_sort_predict is AbstractRecommender.full_sort_predict
            or positive_u.numel() != int(positive_u[-1]) + 1  # one evaluated row per user
        ):
            return super()._neg_sample_batch_eval(batched_data)

        item_field = self.config["ITEM_ID_FIELD"]
        on_device = interaction.to(self.device)
        row_idx = row_idx.to(self.device)
        # RecBole splits predict's rows by eval_batch_size; no split is needed here: a batch
        # holds more rows than that only when it is one user's, and the (users, items)
        # scores made on the way are the size of the matrix returned below.
        origin_scores = score_sampled_rows(model, on_device, row_idx, item_field)
        scores = torch.full((int(positive_u[-1]) + 1, self.tot_item_num), -np.inf, device=self.device)
        scores[row_idx, on_device[item_field]] = origin_scores
        return interaction, scores, positive_u, positive_i

    def _map_reduce(self, result, num_sample):
        """RecBole averages per-rank metrics here; ShardCollector already gathered every
        user's row, so the metrics are those of all users."""
        return result
