"""Which file's value wins: config.yaml < models/<model>.yaml < datasets/<dataset>.yaml
< the model file's dataset_overrides < the command line."""

from pathlib import Path

from ssd4rec.config import collect_values, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def values_for(*argv):
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", parse_overrides(list(argv)))
    return values


def test_ssd4rec_takes_config_then_dataset_file():
    values = values_for("--dataset=amazon-beauty")
    assert values["hidden_size"] == 256 and values["num_layers"] == 1 and values["dropout_prob"] == 0.4


def test_other_models_bring_their_published_settings():
    mamba = values_for("--model=Mamba4Rec", "--dataset=ml-1m")
    assert (mamba["hidden_size"], mamba["num_layers"], mamba["d_state"]) == (64, 1, 32)
    assert mamba["MAX_ITEM_LIST_LENGTH"] == 200
    tim = values_for("--model=TiM4Rec", "--dataset=amazon-beauty")
    assert (tim["hidden_size"], tim["num_layers"], tim["headdim"], tim["dropout_prob"]) == (64, 2, 32, 0.4)


def test_command_line_wins_and_reads_yaml_values():
    values = values_for("--model=TiM4Rec", "--dataset=amazon-beauty", "--num_layers=3", "--topk=[5, 10]")
    assert values["num_layers"] == 3 and values["topk"] == [5, 10]


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 would read 1e-3 as the string '1e-3', which the learning_rate check rejects."""
    from ssd4rec.config import parse_overrides, read_yaml

    assert parse_overrides(["--learning_rate=1e-3", "--weight_decay=5E-5", "--topk=[1e1,20]"]) == {
        "learning_rate": 1e-3, "weight_decay": 5e-5, "topk": [10.0, 20]}
    assert parse_overrides(["--dataset=ml-1m", "--gpu_id=1e"]) == {"dataset": "ml-1m", "gpu_id": "1e"}
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2e-4\nname: 3e\n")
    assert read_yaml(path) == {"learning_rate": 2e-4, "name": "3e"}
