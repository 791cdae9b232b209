"""The synthetic lifelong generator: reproducible, the sizes asked for, and structure a model can learn."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssd4rec.data.readers import INTER_HEADER, read_inter
from ssd4rec.data.sources import ensure_dataset, load_source_options, options_from_mapping
from ssd4rec.data.synthetic import SyntheticParams, generate
from ssd4rec.errors import SSD4RecError

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticParams(users=300, items=800, mean_length=120, min_length=20, max_length=400, clusters=20)


def held_out_hit_rates(df: pd.DataFrame, k: int = 10) -> dict[str, float]:
    """HR@k on each user's last item, training on everything before it, for three simple predictors."""
    train_next: dict[int, Counter] = {}
    popularity: Counter = Counter()
    hits = Counter()
    users = []
    for user, rows in df.groupby("user_id", sort=False):
        items = rows["item_id"].tolist()
        users.append((items[:-1], items[-1]))
        popularity.update(items[:-1])
        for a, b in zip(items[:-2], items[1:-1]):
            train_next.setdefault(a, Counter())[b] += 1
    top_popular = [i for i, _ in popularity.most_common(k)]
    for history, target in users:
        successors = [i for i, _ in train_next.get(history[-1], Counter()).most_common(k)]
        personal = [i for i, _ in Counter(history).most_common(k)]
        hits["popularity"] += target in top_popular
        hits["transition"] += target in successors
        hits["personal"] += target in personal
    return {name: hits[name] / len(users) for name in ("popularity", "transition", "personal")}


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(SMALL), generate(SMALL)
    pd.testing.assert_frame_equal(a, b)
    c = generate(SyntheticParams(**{**SMALL.as_dict(), "seed": 7}))
    assert len(a) != len(c) or not a.equals(c)


def test_sizes_lengths_and_order():
    df = generate(SMALL)
    lengths = df.groupby("user_id").size()
    assert sorted(lengths.index) == list(range(1, SMALL.users + 1))
    assert lengths.min() >= SMALL.min_length and lengths.max() <= SMALL.max_length
    assert abs(lengths.mean() - SMALL.mean_length) < 0.1 * SMALL.mean_length
    assert df["item_id"].between(1, SMALL.items).all()
    # grouped by user, strictly increasing times within a user
    assert (df["user_id"].diff().fillna(1) >= 0).all()
    same_user = df["user_id"].to_numpy()[1:] == df["user_id"].to_numpy()[:-1]
    assert (np.diff(df["timestamp"].to_numpy())[same_user] >= 1).all()
    assert (df["timestamp"] >= SMALL.start).all()


def test_lifelong_lengths_up_to_the_cap():
    df = generate(SyntheticParams(users=40, items=3000, mean_length=4000, length_sigma=0.8, max_length=10000))
    lengths = df.groupby("user_id").size()
    assert lengths.max() == 10000 and lengths.median() > 2000


def test_popularity_is_skewed_by_zipf():
    def top_share(zipf):
        counts = generate(SyntheticParams(**{**SMALL.as_dict(), "zipf": zipf, "p_markov": 0.0,
                                             "p_taste": 0.0}))["item_id"].value_counts()
        return counts.iloc[: SMALL.items // 10].sum() / counts.sum()

    assert top_share(1.2) > 0.6
    assert top_share(0.0) < 0.2


def test_structure_is_learnable():
    rates = held_out_hit_rates(generate(SMALL))
    # the chain: the previous item predicts the next; the taste: a user's own items do too
    assert rates["transition"] > 2 * rates["popularity"], rates
    assert rates["personal"] > 1.3 * rates["popularity"], rates
    # without structure, neither beats popularity by much
    flat = held_out_hit_rates(generate(SyntheticParams(**{**SMALL.as_dict(), "p_markov": 0.0, "p_taste": 0.0})))
    assert flat["transition"] < 1.5 * flat["popularity"], flat


def test_parameter_errors_name_the_key():
    with pytest.raises(SSD4RecError, match=r"unknown key\(s\) source\.user for the synthetic"):
        SyntheticParams.from_mapping({"user": 5})
    with pytest.raises(SSD4RecError, match="source.users must be an integer, found 'many'"):
        SyntheticParams.from_mapping({"users": "many"})
    with pytest.raises(SSD4RecError, match="source.min_length must be at least 3"):
        SyntheticParams.from_mapping({"min_length": 2})
    with pytest.raises(SSD4RecError, match=r"source.p_taste must be at most 1 - p_markov \(0.5\)"):
        SyntheticParams.from_mapping({"p_markov": 0.5, "p_taste": 0.6})
    with pytest.raises(SSD4RecError, match="source.clusters must be at most items"):
        SyntheticParams.from_mapping({"items": 10, "clusters": 11})
    assert SyntheticParams.from_mapping({"mean_gap": 5}).mean_gap == 5.0


# --------------------------------------------------------------------------- as a registered source


TINY_SOURCE = {"users": 30, "items": 200, "mean_length": 30, "max_length": 60, "clusters": 10}


def test_ensure_dataset_generates_writes_atomically_and_regenerates_on_new_parameters(tmp_path):
    config = {"source": {"version": "v1", **TINY_SOURCE}}
    ensure_dataset("synthetic-lifelong", str(tmp_path), options=config)
    target = tmp_path / "synthetic-lifelong" / "synthetic-lifelong.inter"
    assert target.read_text().splitlines()[0] == INTER_HEADER
    assert sorted(p.name for p in target.parent.iterdir()) == [".synthetic-lifelong.source.json",
                                                               "synthetic-lifelong.inter"]
    first = read_inter(target)
    assert first["user_id"].nunique() == 30
    data = target.read_bytes()
    mtime = target.stat().st_mtime_ns

    ensure_dataset("synthetic-lifelong", str(tmp_path), options=config)  # same parameters: left alone
    assert target.stat().st_mtime_ns == mtime
    # --source.users=40 on the command line arrives as a flat key and wins over source:
    ensure_dataset("synthetic-lifelong", str(tmp_path), options={**config, "source.users": 40})
    assert read_inter(target)["user_id"].nunique() == 40
    ensure_dataset("synthetic-lifelong", str(tmp_path), options=config)
    assert target.read_bytes() == data  # back to the first parameters: the very same bytes


def test_a_raw_file_is_refused_and_the_yaml_holds_the_defaults(tmp_path):
    with pytest.raises(SSD4RecError, match="is generated"):
        ensure_dataset("synthetic-lifelong", str(tmp_path), raw=str(tmp_path / "x.inter"),
                       options={"source": TINY_SOURCE})
    opts = load_source_options("synthetic-lifelong")
    assert opts.synthetic == SyntheticParams()
    assert opts.user_inter_num_interval is None and opts.item_inter_num_interval is None
    with pytest.raises(SSD4RecError, match="source.users must be a positive integer"):
        options_from_mapping("synthetic-lifelong", {"source.users": 0})


def test_main_builds_and_trains_on_it(tmp_path):
    from ssd4rec.run import run

    result = run(["--dataset=synthetic-lifelong", "--model=MostPop", "--epochs=1", f"--data_path={tmp_path}",
                  f"--checkpoint_dir={tmp_path / 'saved'}", "--show_progress=False",
                  *[f"--source.{k}={v}" for k, v in TINY_SOURCE.items()]])
    assert (tmp_path / "synthetic-lifelong" / "synthetic-lifelong.inter").is_file()
    # protocol: recmamba comes from datasets/synthetic-lifelong.yaml
    assert set(result["test_result"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}
    assert result["test_result"]["hit@20"] > 0


def load_cli():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "scripts" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_synthetic_cli(tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["--users", "25", "--items", "150", "--mean-length", "30", "--max-length", "50",
                     "--clusters", "5", "--out", str(tmp_path), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "users" in out and "25" in out
    assert f"--data_path={tmp_path} --source.users=25 --source.items=150" in out
    df = read_inter(tmp_path / "synthetic-lifelong" / "synthetic-lifelong.inter")
    assert df["user_id"].nunique() == 25 and df.groupby("user_id").size().max() <= 50
    assert cli.main(["--min-length", "2", "--out", str(tmp_path)]) == 2
    assert "source.min_length must be at least 3" in capsys.readouterr().err
