"""Sampled-negative evaluation (``mode: uni1000``, the Rec-Mamba protocol) on RecBole's real loaders.

ml-100k (shipped in RecBole's wheel) goes through ssd4rec's PackedSequentialDataset,
RecBole's split and its NegSampleEvalDataLoader, first with RecBole's own sampler
(to pin down what is wrong with it), then with ssd4rec.data.sampled_eval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssd4rec import compat
from ssd4rec.config import collect_values, make_recbole_config, parse_overrides
from ssd4rec.data.dataset import PackedSequentialDataset
from ssd4rec.data.protocols import PROTOCOLS
from ssd4rec.data.sampled_eval import UnseenItemSampler, UserItemIndex, data_preparation, score_sampled_rows
from ssd4rec.data.sources import ensure_dataset
from ssd4rec.errors import SSD4RecError
from ssd4rec.models import SSD4Rec
from ssd4rec.run import run
from ssd4rec.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
UNI1000 = "--eval_args={split: {LS: valid_and_test}, order: TO, group_by: user, mode: uni1000}"
TINY = ["--hidden_size=16", "--d_state=8", "--headdim=8", "--chunk_size=16", "--num_layers=1",
        "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False", "--gpu_id="]  # the CPU, also where a GPU is visible


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    ensure_dataset("ml-100k", str(path))
    return path


def recbole_config(data_dir, *argv):
    compat.apply()
    overrides = parse_overrides(["--dataset=ml-100k", UNI1000, f"--data_path={data_dir}", *TINY, *argv])
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", overrides)
    return make_recbole_config(SSD4Rec, "ml-100k", values)


def prepare(data_dir, *argv, fixed=True):
    """(dataset, valid loader, test loader), with ssd4rec's sampler or RecBole's own."""
    from recbole.data import data_preparation as recbole_data_preparation
    from recbole.utils import init_seed

    config = recbole_config(data_dir, *argv)
    init_seed(config["seed"], config["reproducibility"])
    dataset = PackedSequentialDataset(config)
    full = (dataset.inter_feat[dataset.uid_field].to_numpy(), dataset.inter_feat[dataset.iid_field].to_numpy())
    _, valid, test = (data_preparation if fixed else recbole_data_preparation)(config, dataset)
    return dataset, full, valid, test


def negatives_by_user(loader):
    """{user: (positive item, array of negatives)} from one pass over a NegSampleEvalDataLoader."""
    out = {}
    for interaction, row_idx, positive_u, positive_i in loader:
        users = interaction["user_id"].numpy()
        items = interaction["item_id"].numpy()
        labels = interaction["label"].numpy()
        for u in np.unique(users):
            rows = users == u
            pos = items[rows & (labels == 1)]
            assert len(pos) == 1
            out[int(u)] = (int(pos[0]), items[rows & (labels == 0)])
    return out


def user_items(full):
    users, items = full
    result: dict[int, set] = {}
    for u, i in zip(users.tolist(), items.tolist()):
        result.setdefault(u, set()).add(i)
    return result


# --------------------------------------------------------------------------- RecBole as it is


def test_recbole_uni1000_samples_the_users_own_items(data_dir):
    """Why the fix exists: RecBole's RepeatableSampler only excludes the target item."""
    dataset, full, valid, test = prepare(data_dir, fixed=False)
    assert type(test._sampler).__name__ == "RepeatableSampler"
    seen = user_items(full)
    drawn = negatives_by_user(test)
    hits = sum(len(set(neg.tolist()) & seen[u]) for u, (_, neg) in drawn.items())
    assert hits > 1000, f"RecBole drew only {hits} interacted items as negatives"


def test_recbole_negatives_change_from_one_pass_to_the_next(data_dir):
    """Why the fix exists: negatives come from numpy's global RNG at iteration time."""
    _, _, _, test = prepare(data_dir, fixed=False)
    first, second = negatives_by_user(test), negatives_by_user(test)
    assert not all(np.array_equal(first[u][1], second[u][1]) for u in first)


# --------------------------------------------------------------------------- the fix


def test_negatives_are_never_items_the_user_interacted_with(data_dir):
    dataset, full, valid, test = prepare(data_dir)
    seen = user_items(full)
    n_items = dataset.item_num - 1
    for loader in (valid, test):
        assert type(loader._sampler).__name__ == "UnseenItemSampler"
        drawn = negatives_by_user(loader)
        assert len(drawn) == dataset.user_num - 1  # every user is evaluated once
        for u, (pos, neg) in drawn.items():
            assert pos in seen[u]
            assert neg.shape == (1000,)
            distinct = set(neg.tolist())
            assert not distinct & seen[u], f"user {u} got interacted items as negatives"
            assert all(1 <= i <= n_items for i in distinct)
            unseen = n_items - len(seen[u])
            # distinct negatives; users with fewer than 1,000 unseen items get all of them
            assert len(distinct) == min(1000, unseen)


def test_negatives_are_the_same_every_pass_every_run_and_differ_by_phase_and_seed(data_dir):
    _, _, valid, test = prepare(data_dir)
    first, again = negatives_by_user(test), negatives_by_user(test)
    _, _, _, other_run = prepare(data_dir)
    rerun = negatives_by_user(other_run)
    for u in first:
        assert np.array_equal(first[u][1], again[u][1])
        assert np.array_equal(first[u][1], rerun[u][1])
    validation = negatives_by_user(valid)
    assert sum(np.array_equal(first[u][1], validation[u][1]) for u in first) == 0
    _, _, _, seeded = prepare(data_dir, "--seed=7")
    other_seed = negatives_by_user(seeded)
    assert sum(np.array_equal(first[u][1], other_seed[u][1]) for u in first) == 0


def test_full_mode_is_left_to_recbole(data_dir):
    _, _, valid, test = prepare(data_dir, "--eval_args={mode: {valid: full, test: uni1000}}")
    assert type(valid).__name__ == "FullSortEvalDataLoader"
    assert type(test._sampler).__name__ == "UnseenItemSampler"


def test_packed_predict_scores_the_sampled_candidates(data_dir, one_torch_thread):
    """A packing model's predict path on the sampled rows agrees with its full-sort scores,
    and score_sampled_rows gets the same numbers while encoding each history once."""
    import time

    from recbole.utils import init_seed

    dataset, _, _, test = prepare(data_dir)
    config = test.config
    init_seed(config["seed"], config["reproducibility"])
    model = SSD4Rec(config, dataset).eval()
    interaction, row_idx, positive_u, positive_i = next(iter(test))
    with torch.no_grad():
        start = time.perf_counter()
        scores = model.predict(interaction)
        predict_s = time.perf_counter() - start
        start = time.perf_counter()
        once = score_sampled_rows(model, interaction, row_idx, "item_id")
        once_s = time.perf_counter() - start
    users = row_idx.unique()
    assert scores.shape == once.shape == (len(row_idx),) == (1001 * len(users),)
    assert torch.equal(interaction["label"][row_idx.diff(prepend=torch.tensor([-1])) != 0], torch.ones(len(users)))
    torch.testing.assert_close(once, scores, rtol=1e-5, atol=1e-5)
    assert once_s < predict_s / 5, (once_s, predict_s)
    with pytest.raises(ValueError, match="together"):
        score_sampled_rows(model, interaction, row_idx.flip(0).roll(1), "item_id")


# --------------------------------------------------------------------------- the trainer's sampled scoring

# 52 users, 67 items, two users to a uni1000 test batch of 2,002 rows. Each user has fewer than
# 1,000 unseen items, so uni1000 ranks against all of them (padded with repeats); uni20 draws
# 20 distinct negatives.
FEW_USERS = "--user_inter_num_interval=\"[5,21]\""


def trainer_evaluation(data_dir, tmp_path, *argv):
    """(trainer, its test loader, {user: items}), an untrained tiny SSD4Rec."""
    from recbole.utils import init_seed

    dataset, full, _, test = prepare(data_dir, FEW_USERS, *argv)
    config = test.config
    init_seed(config["seed"], config["reproducibility"])
    model = SSD4Rec(config, dataset)
    return Trainer(config, model, tmp_path / "run"), test, user_items(full)


def recorded_evaluation(trainer, loader, method):
    """evaluate() with _neg_sample_batch_eval replaced by method (bound to trainer), which is
    called through; returns (metrics, scores matrix of every batch, sequences encoded)."""
    model = trainer.model
    encoded, scores = [0], []
    forward = type(model).forward

    def counting_forward(*args, **kwargs):
        out = forward(model, *args, **kwargs)
        encoded[0] += out.shape[0]  # (histories, hidden)
        return out

    def recording(batched_data):
        out = method(trainer, batched_data)
        scores.append(out[1].clone())
        return out

    model.forward = counting_forward
    trainer._neg_sample_batch_eval = recording
    try:
        result = trainer.evaluate(loader, load_best_model=False)
    finally:
        del model.forward, trainer._neg_sample_batch_eval
    return result, scores, encoded[0]


@pytest.mark.parametrize("mode, eval_batch_size", [
    ("uni1000", 2048),  # two users a batch
    ("uni1000", 600),   # one user a batch, which RecBole's predict splits in two
    ("uni20", 2048),    # many users a batch, distinct negatives
])
def test_trainer_scores_sampled_batches_as_recbole_does_encoding_each_history_once(
        data_dir, tmp_path, one_torch_thread, mode, eval_batch_size):
    from recbole.trainer import Trainer as RecBoleTrainer

    trainer, test, seen = trainer_evaluation(data_dir, tmp_path, f"--eval_args={{mode: {mode}}}",
                                             f"--eval_batch_size={eval_batch_size}")
    ours, our_scores, our_encoded = recorded_evaluation(trainer, test, Trainer._neg_sample_batch_eval)
    theirs, their_scores, their_encoded = recorded_evaluation(trainer, test, RecBoleTrainer._neg_sample_batch_eval)

    n, users = int(mode[3:]), len(seen)
    assert users == 52 and their_encoded == (n + 1) * users  # RecBole: every history N + 1 times
    assert our_encoded == users
    assert ours == theirs and {"hit@10", "ndcg@10"} <= set(ours)
    assert len(our_scores) == len(their_scores) == len(test)
    for mine, recbole in zip(our_scores, their_scores):
        assert mine.shape == recbole.shape and mine.shape[1] == test._dataset.item_num
        assert torch.equal(torch.isneginf(mine), torch.isneginf(recbole))  # the same cells filled
        # a dot product against a matrix product: equal up to float summation order
        torch.testing.assert_close(mine, recbole, rtol=1e-5, atol=1e-5)
    # filled: the target and N negatives, or all the user's unseen items where fewer
    unseen = [test._dataset.item_num - 1 - len(items) for items in seen.values()]
    assert sum(int((~torch.isneginf(s)).sum()) for s in our_scores) == sum(min(n, u) + 1 for u in unseen)


def test_trainer_leaves_other_sampled_batches_to_recbole(data_dir, tmp_path, monkeypatch):
    from recbole.trainer import Trainer as RecBoleTrainer
    from recbole.utils import EvaluatorType

    trainer, test, _ = trainer_evaluation(data_dir, tmp_path)
    trainer.tot_item_num = test._dataset.item_num
    interaction, row_idx, positive_u, positive_i = batch = next(iter(test))
    calls = []
    monkeypatch.setattr(RecBoleTrainer, "_neg_sample_batch_eval", lambda self, data: calls.append(data) or "recbole")

    assert trainer._neg_sample_batch_eval(batch)[1].shape == (2, test._dataset.item_num) and not calls
    # a user with two evaluated rows (two different histories)
    two_rows = (interaction, row_idx, torch.tensor([0, 0, 1]), positive_i)
    assert trainer._neg_sample_batch_eval(two_rows) == "recbole"
    # value evaluation (scores of rows, no ranking matrix)
    monkeypatch.setitem(trainer.config.final_config_dict, "eval_type", EvaluatorType.VALUE)
    assert trainer._neg_sample_batch_eval(batch) == "recbole"
    monkeypatch.setitem(trainer.config.final_config_dict, "eval_type", EvaluatorType.RANKING)
    # a model that is not one of ssd4rec's: its predict need not equal full_sort_predict
    monkeypatch.setattr(trainer, "model", torch.nn.Linear(1, 1))
    assert trainer._neg_sample_batch_eval(batch) == "recbole"
    assert len(calls) == 3


# --------------------------------------------------------------------------- sampler unit tests


def test_sampler_is_uniform_over_the_unseen_items():
    index = UserItemIndex.from_pairs([1, 1, 1, 1, 2], [2, 5, 5, 9, 3], n_users=3)
    assert index.items_of(1).tolist() == [2, 5, 9] and index.counts().tolist() == [0, 3, 1]
    sampler = UnseenItemSampler(index, item_num=11, seed=0).set_phase("test")  # items 1..10
    unseen = [1, 3, 4, 6, 7, 8, 10]
    assert sorted(sampler.negatives(1, 7).tolist()) == unseen
    counts = np.zeros(11)
    for seed in range(3000):
        draw = UnseenItemSampler(index, 11, seed).set_phase("valid").negatives(1, 2)
        assert len(set(draw.tolist())) == 2
        counts[draw] += 1
    assert counts[[0, 2, 5, 9]].sum() == 0
    expected = 3000 * 2 / 7
    assert np.all(np.abs(counts[unseen] - expected) < 0.1 * expected), counts[unseen]


def test_sampler_layout_matches_recbole():
    index = UserItemIndex.from_pairs([1, 2], [1, 2], n_users=3)
    sampler = UnseenItemSampler(index, item_num=50, seed=3).set_phase("test")
    out = sampler.sample_by_user_ids(np.array([1, 2]), np.array([1, 2]), 5).numpy()
    # RecBole's layout: value j * len(users) + k is the j-th negative of user k
    assert out[0::2].tolist() == sampler.negatives(1, 5).tolist()
    assert out[1::2].tolist() == sampler.negatives(2, 5).tolist()


def test_fewer_unseen_items_than_asked_gives_all_of_them_and_a_full_user_is_an_error():
    index = UserItemIndex.from_pairs([1, 1, 1], [1, 2, 3], n_users=2)
    sampler = UnseenItemSampler(index, item_num=6, seed=1).set_phase("test")
    draw = sampler.negatives(1, 10)
    assert len(draw) == 10 and set(draw.tolist()) == {4, 5}
    with pytest.raises(SSD4RecError, match=r"user 1 \(and 0 more\) interacted with every one of the 3 items"):
        UnseenItemSampler(index, item_num=4, seed=1)
    with pytest.raises(SSD4RecError, match="'seed'"):
        UnseenItemSampler(index, item_num=6, seed=-1)


# --------------------------------------------------------------------------- protocol and end to end


def values_for(*argv):
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", parse_overrides(list(argv)))
    return values


def test_protocol_recmamba_sets_the_evaluation_keys():
    values = values_for("--dataset=ml-1m", "--protocol=recmamba")
    assert values["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                                   "mode": "uni1000"}
    assert (values["metrics"], values["topk"], values["valid_metric"]) == (["Hit", "NDCG"], [5, 10, 20], "Hit@10")
    # the command line still wins over the protocol
    values = values_for("--dataset=ml-1m", "--protocol=recmamba", "--topk=[10]", "--eval_args={mode: uni100}")
    assert values["topk"] == [10] and values["eval_args"]["mode"] == "uni100"
    assert values["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert PROTOCOLS["recmamba"]["eval_args"]["mode"] == "uni1000"  # the preset itself is untouched


def test_an_eval_args_override_keeps_the_leave_one_out_split():
    values = values_for("--dataset=ml-1m", "--eval_args={mode: uni1000}")
    assert values["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                                   "mode": "uni1000"}
    assert values_for("--dataset=ml-1m")["eval_args"]["mode"] == "full"


def test_protocol_errors():
    with pytest.raises(SSD4RecError, match="unknown protocol 'recmambo'; expected one of recmamba, ssd4rec"):
        values_for("--dataset=ml-1m", "--protocol=recmambo")
    with pytest.raises(SSD4RecError, match="'eval_args': expected a mapping"):
        values_for("--dataset=ml-1m", "--eval_args=uni1000")


def test_main_runs_the_recmamba_protocol_and_a_checkpoint_reproduces_it(data_dir, tmp_path, one_torch_thread):
    # Users with at most 21 ratings only (about 60): every evaluation scores 1,001 rows per user.
    few_users = "--user_inter_num_interval=\"[5,21]\""
    args = ["--dataset=ml-100k", "--model=SSD4Rec", "--epochs=1", "--protocol=recmamba", f"--data_path={data_dir}",
            f"--checkpoint_dir={tmp_path}", few_users, *TINY]
    result = run(args)
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}
    hit = [result["test_result"][f"hit@{k}"] for k in (5, 10, 20)]
    ndcg = [result["test_result"][f"ndcg@{k}"] for k in (5, 10, 20)]
    assert 0 <= hit[0] <= hit[1] <= hit[2] <= 1 and all(n <= h for n, h in zip(ndcg, hit))
    # The same negatives again: evaluating the checkpoint gives the very same numbers.
    again = run([f"--checkpoint={result['checkpoint']}", f"--data_path={data_dir}", "--show_progress=False",
                 "--protocol=recmamba", few_users])
    assert again["test_result"] == result["test_result"]
