"""Data-parallel training on several processes through torch.distributed, as RecBole does it.

``python main.py --nproc=N`` spawns N processes on this machine (RecBole's keys
``nproc``, ``world_size``, ``offset``, ``ip``, ``port`` work as in RecBole's
``run_recbole``); ``torchrun --nproc_per_node=N main.py ...`` starts them itself
(RANK, LOCAL_RANK, WORLD_SIZE in the environment). Each process trains one model
replica on its own device: ``cuda:<local rank>`` with NCCL, or the CPU with gloo
(``--gpu_id=`` picks the CPU on a GPU machine).

What RecBole 1.2.1 does that works, and is used as it is:
  - with ``config["single_spec"]`` False its dataloaders draw rows through a
    ``DistributedSampler`` and give each rank ``train_batch_size // world_size`` rows a
    step: the global batch stays ``train_batch_size`` (``plan`` refuses sizes that do
    not divide), and the global batches of an epoch are consecutive chunks of one
    permutation, as in one process;
  - its Trainer calls the sampler's ``set_epoch`` and reduces gradients through a
    ``DistributedDataParallel`` reducer while calling ``model.calculate_loss`` directly
    (``set_reduce_hook``, ``sync_grad_loss``), so ``trainer.model`` stays the bare module
    and checkpoints carry no ``module.`` prefix. (With ``graph_step: True`` the steps are
    CUDA graphs and no DDP wrapper is built: ssd4rec.gradient_sync averages the gradients,
    one all-reduce a step, and copies rank 0's weights to the others at the start.)

What breaks, and is replaced here:
  - ``Config._init_device`` starts the group only with a hard-coded NCCL backend on
    ``cuda:<local_rank>``: ``start`` and ``configure`` do it for CUDA and CPU;
  - ``AbstractTrainer`` wraps the model with ``device_ids=[local_rank]`` (refused for a
    CPU module) and broadcasts all buffers before every step (our history store, 16 MB
    a step on ML-1M): ``wrap_model``;
  - evaluation: the ``DistributedSampler`` pads the users of each rank by repeating
    some, and ``Trainer._map_reduce`` averages per-rank metrics weighted by a count of
    batches: ``ShardCollector`` gathers every user's ranking row exactly once and the
    metrics are computed over all users, equal to one process's;
  - only global rank 0 writes logs and checkpoints (``init_logger``, ``is_main_process``;
    RecBole lets every node's local rank 0 save, and creates a log file on every rank);
  - the sampler's shuffle seed is RecBole's constant 0: ``configure_loader`` sets
    ``config["seed"]``.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import shutil
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from recbole.evaluator import Collector

from ssd4rec.errors import SSD4RecError

# Models whose training is not gradient descent and whose state is per-rank data.
SINGLE_PROCESS_MODELS = {"MostPop": "it counts items in buffers, which each rank would count for its shard only"}

# DataStruct entries that hold one row per evaluated user (RecBole's Collector resets
# exactly these after each evaluation); the others describe the data or the model.
PER_USER_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of a run.

    size: processes in all; rank: this one's global rank; local_rank: its index among
    the processes (and GPUs) of this machine; nproc: processes on this machine.
    spawn: this process is the launcher of ``python main.py --nproc=N`` and trains
    nothing itself; its workers get ranks offset .. offset + nproc - 1.
    """

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    nproc: int = 1
    offset: int = 0
    device_type: str = "cpu"
    gpu_id: str = ""
    spawn: bool = False
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @property
    def distributed(self):
        return self.size > 1 and not self.spawn

    @property
    def backend(self):
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device(self):
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")


def _int_key(values, key, default, minimum):
    value = values.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SSD4RecError(f"config key {key!r}: expected an integer >= {minimum}, got {value!r}")
    return value


def free_port(addr):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def _devices(values, nproc):
    """('cuda' or 'cpu', gpu_id naming the GPUs the processes of this machine use).

    RecBole's Config sets CUDA_VISIBLE_DEVICES to ``gpu_id`` ('0' by default), which in
    a process of rank 1 would hide its GPU; so unless the user names GPUs, gpu_id is
    every GPU already visible. An empty ``gpu_id`` (``--gpu_id=``) means the CPU.
    """
    if "gpu_id" in values and values["gpu_id"] in (None, ""):
        return "cpu", ""
    # device_count reads NVML where it can: it does not start CUDA, so the
    # CUDA_VISIBLE_DEVICES that start() sets still applies.
    visible = torch.cuda.device_count()
    if visible == 0:
        return "cpu", ""  # as RecBole: without CUDA, whatever gpu_id says
    if "gpu_id" in values:
        given = values["gpu_id"]
        gpu_id = ",".join(map(str, given)) if isinstance(given, (list, tuple)) else str(given)
        available = len(gpu_id.split(","))
        have = f"gpu_id '{gpu_id}' names {available}"
    else:
        available = visible
        gpu_id = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(available))
        have = f"{available} {'is' if available == 1 else 'are'} visible"
    if nproc > available:
        raise SSD4RecError(
            f"config key 'nproc': {nproc} processes need {nproc} GPUs, but {have}; "
            "lower --nproc, or give --gpu_id= to train on the CPU"
        )
    return "cuda", gpu_id


def plan(values, env=None):
    """The World of this process, from the config values and the launcher's environment.

    Checks nproc, world_size, offset, port and that train_batch_size divides among the
    processes; raises SSD4RecError naming the key otherwise.
    """
    env = os.environ if env is None else env
    given_nproc = values.get("nproc")
    if given_nproc is not None:
        _int_key(values, "nproc", 1, 1)
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (or our own spawn)
        size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        nproc = int(env.get("LOCAL_WORLD_SIZE", size))
        if given_nproc is not None and given_nproc != nproc:
            raise SSD4RecError(
                f"config key 'nproc': {given_nproc}, but the launcher started {nproc} processes on this "
                "machine (LOCAL_WORLD_SIZE); leave --nproc out when launching with torchrun"
            )
        offset, spawn = rank - local_rank, False
    else:
        nproc = _int_key(values, "nproc", 1, 1)
        size = _int_key(values, "world_size", nproc, 1)
        offset = _int_key(values, "offset", 0, 0)
        if size == 1 and nproc == 1:
            return World()
        if offset + nproc > size:
            raise SSD4RecError(
                f"config keys 'offset' + 'nproc' = {offset} + {nproc} exceed 'world_size' = {size}: "
                "the ranks of this machine must lie in 0 .. world_size - 1"
            )
        rank = local_rank = 0
        spawn = True
    if size == 1:
        return World()
    model = values.get("model") or "SSD4Rec"
    if model in SINGLE_PROCESS_MODELS:
        raise SSD4RecError(
            f"config key 'nproc': model {model} trains in one process only ({SINGLE_PROCESS_MODELS[model]})"
        )
    batch = values.get("train_batch_size")
    if isinstance(batch, int) and batch % size:
        raise SSD4RecError(
            f"config key 'train_batch_size': {batch} rows do not split evenly among {size} processes; "
            f"use a multiple of {size} so that every step still trains on train_batch_size rows"
        )
    device_type, gpu_id = _devices(values, nproc)
    addr = str(values.get("ip") or "127.0.0.1")
    port = values.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise SSD4RecError(f"config key 'port': expected a TCP port number (1-65535), got {port!r}")
    if spawn and port is None:
        if size > nproc:
            raise SSD4RecError(
                f"config key 'port': with world_size {size} > nproc {nproc} (several machines), give the "
                "rendezvous --ip and --port of the machine of rank 0"
            )
        port = free_port(addr)
    return World(size=size, rank=rank, local_rank=local_rank, nproc=nproc, offset=offset,
                 device_type=device_type, gpu_id=gpu_id, spawn=spawn, master_addr=addr, master_port=port or 0)


# --------------------------------------------------------------------------------------------
# launching: python main.py --nproc=N
# --------------------------------------------------------------------------------------------
def _worker(local_rank, target, args, env, offset, queue):
    """One spawned process: the launcher's environment as torchrun would set it, then target."""
    os.environ.update(env)
    os.environ["RANK"] = str(offset + local_rank)
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        result = target(*args)
    except SSD4RecError as err:
        queue.put(("error", str(err)))
        raise  # a non-zero exit makes torch.multiprocessing stop the other workers
    # Every rank finished its run; wait for all before leaving the group. Without it a rank
    # that destroys its gloo group while a peer still tears its own down can abort the peer
    # ("terminate called without an active exception", SIGABRT; seen once in CI). A rank that
    # failed never gets here, and torch.multiprocessing stops the others.
    barrier()
    stop()  # spawned processes end without running atexit handlers
    if local_rank == 0:
        queue.put(("result", result))


def _drain(queue):
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def spawn(target, args, world):
    """Run ``target(*args)`` in world.nproc new processes; the value local rank 0 returned.

    An SSD4RecError in any worker is raised here with its message (the other workers are
    stopped); any other failure raises torch.multiprocessing's exception with the trace.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    env = {
        "MASTER_ADDR": world.master_addr,
        "MASTER_PORT": str(world.master_port),
        "WORLD_SIZE": str(world.size),
        "LOCAL_WORLD_SIZE": str(world.nproc),
    }
    try:
        torch.multiprocessing.spawn(
            _worker, args=(target, args, env, world.offset, queue), nprocs=world.nproc, join=True
        )
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException):
        errors = [message for kind, message in _drain(queue) if kind == "error"]
        if errors:
            raise SSD4RecError(errors[0]) from None
        raise
    results = [value for kind, value in _drain(queue) if kind == "result"]
    return results[0] if results else None


# --------------------------------------------------------------------------------------------
# inside a worker
# --------------------------------------------------------------------------------------------
def start(world, values):
    """Join the process group (nothing for one process); point RecBole at this rank's GPUs.

    values["gpu_id"] is set to the GPUs of this machine, which RecBole's Config turns into
    CUDA_VISIBLE_DEVICES; it is set here already, before CUDA starts in this process.
    """
    if not world.distributed or dist.is_initialized():  # a second run() in the same worker reuses the group
        return
    # torchrun sets OMP_NUM_THREADS=1 for several processes a machine; our spawn shares
    # the cores out instead of letting N processes each use all of them.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.nproc))
    values["gpu_id"] = world.gpu_id
    kwargs = {}
    if world.device_type == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = world.gpu_id
        torch.cuda.set_device(world.local_rank)
        kwargs["device_id"] = world.device
    dist.init_process_group(world.backend, init_method="env://", rank=world.rank, world_size=world.size, **kwargs)
    # A torchrun worker leaves the group when its interpreter exits; a spawned one in _worker.
    atexit.register(stop)


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def configure(config, world):
    """Put a RecBole Config in RecBole's distributed state (what its _init_device would do)."""
    if not world.distributed:
        return
    config["single_spec"] = False
    config["local_rank"] = world.local_rank
    config["world_size"] = world.size
    config["nproc"] = world.nproc
    config["offset"] = world.offset
    config["device"] = world.device
    if world.rank != 0:
        config["state"] = "error"  # RecBole's choice: other ranks log errors only
        config["show_progress"] = False


def configure_loader(loader, config):
    """Seed a training loader's DistributedSampler with config["seed"] (RecBole leaves it 0)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        sampler.seed = int(config["seed"])


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (e.g. builds a missing dataset file), then the others."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def from_rank_zero(obj):
    """Rank 0's value of obj on every rank (e.g. a run directory named by the time)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value, device):
    """A float, or a tuple of floats, averaged over the ranks (an epoch's loss sum)."""
    if not dist.is_initialized() or value is None:
        return value
    parts = value if isinstance(value, tuple) else (value,)
    tensor = torch.tensor(parts, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    mean = (tensor / dist.get_world_size()).tolist()
    return tuple(mean) if isinstance(value, tuple) else mean[0]


def init_logger(config):
    """RecBole's logger (console and log file) on rank 0; errors to stderr on the others."""
    if is_main_process():
        from recbole.utils import init_logger as recbole_init_logger

        recbole_init_logger(config)
    else:
        logging.basicConfig(level=logging.ERROR, handlers=[logging.StreamHandler()], force=True)


class _NullWriter:
    """Stands in for a tensorboard SummaryWriter on ranks that write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def silence_tensorboard(writer):
    """Close and delete the event file RecBole's Trainer just opened on a rank other than 0."""
    log_dir = getattr(writer, "log_dir", None)
    writer.close()
    if log_dir and os.path.isdir(log_dir):
        entries = os.listdir(log_dir)
        if all(name.startswith("events.out.tfevents") for name in entries):
            shutil.rmtree(log_dir, ignore_errors=True)
    return _NullWriter()


def _ddp_options():
    """find_unused_parameters=False is valid because RecBole's sync_grad_loss adds
    0 * sum(p) of every parameter to the loss, so each one has a gradient every step;
    gradient_as_bucket_view saves a copy of every gradient into the all-reduce buckets.
    No buffer broadcast before each step: our models' only buffers are the history store,
    identical on every rank (torch 2.13 renamed the flag; 2.11 knows the old one).
    """
    from torch.nn.parallel import DistributedDataParallel

    options = {"find_unused_parameters": False, "gradient_as_bucket_view": True}
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    options["forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"] = False
    return options


def sync_batchnorm(model, device):
    """BatchNorm layers as SyncBatchNorm on CUDA, as RecBole does (our models have none).

    Before the optimizer is built: the conversion may create new parameters."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_model(model, device):
    """DistributedDataParallel(model) for RecBole's Trainer.

    RecBole keeps ``trainer.model`` the bare module (what calculate_loss, the AMP path,
    checkpoints and evaluation use) and ``trainer.distributed_model`` the wrapper, whose
    reducer averages the gradients during backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **_ddp_options())


def _shard_rows(sampler):
    """(rows this rank evaluates, of which the first ones are real users) for a
    DistributedSampler without shuffling: it pads the index list to a multiple of the
    world size by repeating its head, so the repeats are each rank's trailing rows."""
    total = len(sampler.dataset)
    return sampler.num_samples, len(range(sampler.rank, total, sampler.num_replicas))


class ShardCollector(Collector):
    """RecBole's Collector for one rank's shard of the evaluated users.

    ``get_data_struct`` drops the rows of the sampler's padding repeats and gathers the
    per-user rows (rec.topk: (users, max_k + 1), ...) of all ranks, so every rank's
    evaluator sees each user exactly once, as a single process does. ``set_shard`` must
    be given the evaluation loader's sampler before each evaluation.
    """

    shard = None

    def set_shard(self, sampler):
        self.shard = _shard_rows(sampler)

    def get_data_struct(self):
        struct = super().get_data_struct()
        rows = {key: struct[key] for key in PER_USER_KEYS if key in struct}
        seen, keep = self.shard
        for key, value in rows.items():
            if value.shape[0] != seen:
                raise SSD4RecError(
                    f"distributed evaluation expects one {key} row per evaluated user ({seen}), got "
                    f"{value.shape[0]}; evaluate this configuration with nproc 1"
                )
        shards = gather({key: value[:keep] for key, value in rows.items()})
        for key in rows:
            struct.set(key, torch.cat([shard[key] for shard in shards], dim=0))
        return struct
