"""Several processes through torch.distributed (ssd4rec.distributed), on CPU with gloo.

End to end on ml-100k at a tiny size: one process against two with the same seed
(close metrics, one checkpoint, one log, each rank trained on half the rows),
evaluation of the same weights equal with one and two processes, resume on two
processes. Pieces: RecBole's dataloaders split every global batch among the ranks,
the gradient reduction averages the ranks' gradients, padding users are dropped from
the gathered evaluation rows, and bad settings name their key.
"""

import math
import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ssd4rec import distributed
from ssd4rec.errors import SSD4RecError
from ssd4rec.run import run

ROOT = Path(__file__).resolve().parents[1]
BATCH = 512  # rows a step in all; a smaller batch only makes the epoch longer on CPU
TINY = [
    "--dataset=ml-100k",
    "--hidden_size=16",
    "--d_state=16",
    "--chunk_size=32",
    "--MAX_ITEM_LIST_LENGTH=20",
    f"--train_batch_size={BATCH}",
    "--epochs=1",
    "--show_progress=False",
    "--seed=2024",
    "--gpu_id=",  # the CPU and gloo, also where GPUs are visible (NCCL needs a GPU per process)
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


def _run_in(folder, argv):
    """run(argv) with folder as the working directory, where RecBole writes its logs."""
    folder.mkdir(parents=True, exist_ok=True)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(1)  # 2 shared cores; the spawned workers take one each
    try:
        return run(argv)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_and_two(workdir):
    data = f"--data_path={workdir / 'data'}"
    one = _run_in(workdir / "one", TINY + [data, f"--checkpoint_dir={workdir / 'one' / 'saved'}"])
    two = _run_in(workdir / "two", TINY + [data, f"--checkpoint_dir={workdir / 'two' / 'saved'}", "--nproc=2"])
    return one, two


def test_two_processes_each_train_on_half_the_rows_in_as_many_steps(one_and_two):
    one, two = one_and_two
    assert one["world_size"] == 1 and two["world_size"] == 2
    (rows,), (steps,) = one["train_rows_per_rank"], one["train_steps_per_rank"]
    # DistributedSampler gives each rank ceil(rows / 2) rows (one repeated if rows is odd);
    # each step takes BATCH / 2 of them, so the two ranks together step through BATCH-row batches.
    assert two["train_rows_per_rank"] == [math.ceil(rows / 2)] * 2
    assert two["train_steps_per_rank"] == [steps, steps] == [math.ceil(rows / BATCH)] * 2


def test_two_processes_give_metrics_close_to_one(one_and_two):
    one, two = one_and_two
    print({"one": one["test_result"], "two": two["test_result"]})
    assert set(two["test_result"]) == set(one["test_result"])
    # Different shuffles and dropout draws: close, not equal.
    assert two["test_result"]["ndcg@10"] == pytest.approx(one["test_result"]["ndcg@10"], abs=0.01)
    assert two["test_result"]["hit@10"] == pytest.approx(one["test_result"]["hit@10"], abs=0.02)
    assert two["test_result"]["ndcg@10"] > 0.015  # trained: a random ranking scores about 0.003


def test_only_rank_zero_writes_a_run_directory_and_a_log(one_and_two, workdir):
    _, two = one_and_two
    runs = list((workdir / "two" / "saved").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == ["best.pth", "last.pth"]
    assert two["checkpoint"] == str(runs[0] / "best.pth")
    assert torch.load(runs[0] / "last.pth", weights_only=True)["finished"] is True
    assert len(list((workdir / "two" / "log").rglob("*.log"))) == 1
    assert len(list((workdir / "two" / "log_tensorboard").iterdir())) == 1


def test_evaluation_on_two_processes_equals_one_process(one_and_two, workdir):
    """The 2-process run tested its best.pth on two ranks; one process must agree."""
    _, two = one_and_two
    again = _run_in(workdir / "eval", [f"--checkpoint={two['checkpoint']}", f"--data_path={workdir / 'data'}",
                                       "--show_progress=False"])
    assert again["test_result"] == pytest.approx(two["test_result"], abs=1e-4)


def test_an_interrupted_two_process_run_resumes_on_two_processes(one_and_two, workdir):
    _, two = one_and_two
    last = torch.load(Path(two["checkpoint"]).parent / "last.pth", weights_only=True)
    last["finished"] = False  # as if it had died after epoch 0 of 2
    resume_dir = workdir / "resume"
    resume_dir.mkdir()
    torch.save(last, resume_dir / "last.pth")
    torch.save(torch.load(two["checkpoint"], weights_only=True), resume_dir / "best.pth")
    # A bigger batch only to make the resumed epoch short.
    result = _run_in(workdir / "resume_cwd", [f"--checkpoint={resume_dir / 'last.pth'}",
                                              f"--data_path={workdir / 'data'}", "--epochs=2", "--nproc=2", "--gpu_id=",
                                              "--train_batch_size=1024", "--show_progress=False"])
    resumed = torch.load(resume_dir / "last.pth", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["finished"] is True
    assert result["epochs_run"] == 1 and result["world_size"] == 2
    assert result["checkpoint"] == str(resume_dir / "best.pth")


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_split(workdir):
    from ssd4rec.config import collect_values, make_recbole_config
    from ssd4rec.data.dataset import PackedSequentialDataset
    from ssd4rec.data.sources import ensure_dataset
    from ssd4rec.models import MODELS

    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", {"dataset": "ml-100k"})
    values["data_path"] = ensure_dataset("ml-100k", str(workdir / "data"), options=values)
    config = make_recbole_config(MODELS["SSD4Rec"], "ml-100k", values)
    train, _, _ = PackedSequentialDataset(config).build()
    return config, train


def _rank_batches(config, train, monkeypatch, rank, size, seed):
    """The batches RecBole's training loader gives one rank: a list of (rows,) history_end."""
    from recbole.data.dataloader import TrainDataLoader

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: size)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    distributed.configure(config, distributed.World(size=size, rank=rank, local_rank=rank, nproc=size))
    config["seed"] = seed
    loader = TrainDataLoader(config, train, None, shuffle=True)
    distributed.configure_loader(loader, config)
    loader.sampler.set_epoch(0)
    return [batch["history_end"] for batch in loader]


def test_ranks_split_every_global_batch_of_train_batch_size_rows(train_split, monkeypatch):
    config, train = train_split
    batch = config["train_batch_size"]
    ranks = [_rank_batches(config, train, monkeypatch, r, 2, seed=7) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(train) / batch)
    seen = []
    for step, (a, b) in enumerate(zip(*ranks)):
        if step < len(ranks[0]) - 1:
            assert len(a) == len(b) == batch // 2
        together = torch.cat([a, b])
        assert len(set(together.tolist())) == len(together)  # no row on both ranks
        seen.append(together)
    seen = torch.cat(seen)
    assert set(seen.tolist()) == set(train.inter_feat["history_end"].tolist())
    assert len(seen) - len(train) == len(train) % 2  # at most one row repeated to even the ranks
    # The shuffle follows config["seed"] (RecBole's sampler would use 0 for every seed).
    other = _rank_batches(config, train, monkeypatch, 0, 2, seed=8)
    assert not torch.equal(other[0], ranks[0][0])


def _reduce_worker(rank, port, out):
    """One of two gloo ranks: RecBole's reduction trick on a DDP from wrap_model."""
    from recbole.trainer.trainer import AbstractTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _toy_model()
    trainer = types.SimpleNamespace(model=model, device=torch.device("cpu"))
    trainer.distributed_model = distributed.wrap_model(model, trainer.device)
    x, y = _toy_data()
    AbstractTrainer.set_reduce_hook(trainer)
    loss = torch.nn.functional.mse_loss(model(x[rank::2]), y[rank::2]) + AbstractTrainer.sync_grad_loss(trainer)
    loss.backward()
    torch.save({name: p.grad for name, p in model.named_parameters()}, out / f"grad{rank}.pt")
    dist.destroy_process_group()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.unused = torch.nn.Parameter(torch.ones(2))  # no gradient from the loss itself

    def forward(self, x):
        return self.linear(x).squeeze(1)


def _toy_model():
    torch.manual_seed(0)
    return _Toy()


def _toy_data(rows=8):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, 3, generator=generator), torch.randn(rows, generator=generator)


@pytest.mark.parametrize("mode", ["ddp", "flat"])
def test_two_ranks_train_as_one_process_on_the_whole_batches(mode, tmp_path):
    """Both ways of averaging gradients (DDP's reducer for eager steps, one flat all-reduce
    for graphed ones, ssd4rec.gradient_sync) give the steps of one process on the whole
    8-row batches, from rank 0's initial weights."""
    torch.multiprocessing.spawn(_steps_worker, args=(distributed.free_port("127.0.0.1"), tmp_path, mode), nprocs=2)
    model = _toy_model()
    # SGD, whose step scales with the gradient (Adam's would hide a sum taken for a mean).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    x, y = _toy_data(rows=24)
    for step in (0, 8, 16):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[step:step + 8]), y[step:step + 8]).backward()
        optimizer.step()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"{mode}{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        assert result["loss_sum"].dtype == torch.float64


def test_flat_gradients_are_views_that_survive_zero_grad():
    from ssd4rec.gradient_sync import FlatGradients

    model = _toy_model()
    flat = FlatGradients(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()  # sets every .grad to None
    flat.zero_()
    x, y = _toy_data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr() for g in grads)
    assert torch.equal(flat.buffer, torch.cat([g.flatten() for g in grads]))
    assert torch.equal(model.unused.grad, torch.zeros(2))  # a gradient for every parameter, as under DDP
    assert flat.buffer.abs().sum() > 0
    before = flat.buffer.clone()
    flat.average_()  # no process group: nothing to average
    assert torch.equal(flat.buffer, before)


def test_gradients_are_averaged_over_ranks_as_one_full_batch(tmp_path):
    torch.multiprocessing.spawn(_reduce_worker, args=(distributed.free_port("127.0.0.1"), tmp_path), nprocs=2)
    model = _toy_model()
    x, y = _toy_data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert torch.allclose(grads["linear.weight"], model.linear.weight.grad, atol=1e-6)
        assert torch.allclose(grads["linear.bias"], model.linear.bias.grad, atol=1e-6)
        assert torch.equal(grads["unused"], torch.zeros(2))


def _steps_worker(rank, port, out, mode):
    """One of two gloo ranks: three of the trainer's steps (Trainer._train_steps) on this
    rank's half of each batch, its gradients averaged by DDP's reducer (mode "ddp") or by
    one flat all-reduce (mode "flat", what graphed steps use), from weights that differ by
    rank until the run copies rank 0's."""
    from recbole.trainer.trainer import AbstractTrainer

    from ssd4rec.gradient_sync import FlatGradients, broadcast_module
    from ssd4rec.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    model = _Toy()
    trainer = types.SimpleNamespace(
        model=model, device=torch.device("cpu"), config={"single_spec": False}, enable_amp=False,
        enable_scaler=False, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), clip_grad_norm=None,
        gpu_available=False, rows_trained=0, steps_trained=0, flat_gradients=None, _hook_input=None)
    if mode == "flat":
        broadcast_module(model)
        trainer.flat_gradients = FlatGradients(model.parameters())
    else:
        trainer.distributed_model = distributed.wrap_model(model, trainer.device)
        trainer.set_reduce_hook = types.MethodType(Trainer.set_reduce_hook, trainer)
        trainer.sync_grad_loss = types.MethodType(AbstractTrainer.sync_grad_loss, trainer)
    x, y = _toy_data(rows=24)
    halves = [(x[step:step + 8][rank::2], y[step:step + 8][rank::2]) for step in (0, 8, 16)]
    total = Trainer._train_steps(trainer, halves, lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]))
    torch.save({"params": dict(model.state_dict()), "loss_sum": total}, out / f"{mode}{rank}.pt")
    dist.destroy_process_group()


def test_evaluation_rows_of_padding_users_are_dropped(train_split):
    """943 users on 2 ranks: the sampler gives rank 1 472 rows, the last a repeat of user 0."""
    config, _ = train_split
    collector = distributed.ShardCollector(config)
    topk = torch.arange(472 * 3).view(472, 3)  # (users, max_k + 1) rows as RecBole collects them
    collector.data_struct.update_tensor("rec.topk", topk)
    collector.set_shard(types.SimpleNamespace(dataset=range(943), num_replicas=2, rank=1, num_samples=472))
    struct = collector.get_data_struct()
    assert torch.equal(struct.get("rec.topk"), topk[:471])  # without a process group: this rank's rows
    assert "rec.topk" not in collector.data_struct  # reset for the next evaluation, as RecBole's

    collector.set_shard(types.SimpleNamespace(dataset=range(943), num_replicas=2, rank=0, num_samples=472))
    collector.data_struct.update_tensor("rec.topk", topk)
    assert torch.equal(collector.get_data_struct().get("rec.topk"), topk)
    collector.data_struct.update_tensor("rec.topk", topk[:5])
    with pytest.raises(SSD4RecError, match="one rec.topk row per evaluated user"):
        collector.get_data_struct()


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--nproc=0"], "'nproc'"),
        (["--nproc=two"], "'nproc'"),
        (["--nproc=2", "--train_batch_size=255"], "'train_batch_size'"),
        (["--nproc=2", "--model=MostPop"], "'nproc'"),
        (["--nproc=2", "--world_size=1"], "'offset' + 'nproc'"),
        (["--nproc=2", "--world_size=4"], "'port'"),
    ],
)
def test_bad_settings_name_their_key(argv, key, workdir):
    with pytest.raises(SSD4RecError, match=re.escape(key)):
        run(argv + [f"--data_path={workdir / 'data'}", "--gpu_id="])


def test_more_processes_than_gpus_is_refused_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(SSD4RecError, match="'nproc': 3 processes need 3 GPUs, but 2 are visible"):
        distributed.plan({"nproc": 3, "train_batch_size": 1023}, env={})
    world = distributed.plan({"nproc": 2, "train_batch_size": 1024}, env={})
    assert (world.device_type, world.gpu_id, world.backend, world.spawn) == ("cuda", "0,1", "nccl", True)
    with pytest.raises(SSD4RecError, match="gpu_id '3' names 1"):
        distributed.plan({"nproc": 2, "gpu_id": 3, "train_batch_size": 1024}, env={})
    cpu = distributed.plan({"nproc": 2, "gpu_id": "", "train_batch_size": 1024}, env={})
    assert (cpu.device_type, cpu.backend) == ("cpu", "gloo")


def test_torchrun_environment_decides_the_ranks():
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = distributed.plan({"train_batch_size": 1024, "gpu_id": ""}, env=env)
    assert (world.size, world.rank, world.local_rank, world.spawn, world.distributed) == (2, 1, 1, False, True)
    with pytest.raises(SSD4RecError, match="'nproc': 4, but the launcher started 2"):
        distributed.plan({"nproc": 4, "train_batch_size": 1024}, env=env)
