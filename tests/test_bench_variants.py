"""scripts/bench_variants.py: variant parsing, the config restored after each variant, the table."""

import pytest

from tests.script_support import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_variants")


def test_variant_values_are_read_as_yaml(bench):
    assert bench.parse_variant("both=compile_glue=true,chunk_size=128") == (
        "both", {"compile_glue": True, "chunk_size": 128})


@pytest.mark.parametrize("text", ["glue", "=chunk_size=128", "glue=", "glue=chunk_size"])
def test_malformed_variant_is_refused(bench, text):
    with pytest.raises(Exception, match="chunk_size|NAME=key=value|expected"):
        bench.parse_variant(text)


def test_reserved_names_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", "x.json", "--variant", "default=chunk_size=64"])
    assert "reserved" in capsys.readouterr().err


class _Config(dict):
    """What ssd4rec_variant uses of RecBole's Config: in, [] and []=."""


def test_each_variant_sees_its_keys_and_the_config_is_restored(bench, monkeypatch):
    import ssd4rec.models.ssd4rec as ssd4rec_module
    import ssd4rec.trainer as trainer_module

    seen = []

    class FakeModel:
        def __init__(self, config, dataset):
            seen.append({k: config[k] if k in config else None for k in ("chunk_size", "compile_glue")})

        def to(self, device):
            return self

    monkeypatch.setattr(ssd4rec_module, "SSD4Rec", FakeModel)
    monkeypatch.setattr(trainer_module, "Trainer", lambda config, model, path: (model, path))
    config = _Config(seed=1, reproducibility=True, device="cpu", chunk_size=256)
    loader = type("Loader", (), {"_dataset": None})()
    bench.ssd4rec_variant(config, loader, {"chunk_size": 128, "compile_glue": True})
    bench.ssd4rec_variant(config, loader, {})
    assert seen == [{"chunk_size": 128, "compile_glue": True}, {"chunk_size": 256, "compile_glue": None}]
    assert config["chunk_size"] == 256


def test_table_gives_ratios_to_default_and_sasrec(bench):
    results = dict(env={"gpu": "GPU"}, dataset="ml-1m", batch_size=1024, precision="bf16",
                   max_history_length=200, batches=40, repeats=2,
                   variants={"default": {}, "chunk128": {"chunk_size": 128}},
                   runs=[dict(name=n, s_per_batch=s) for n, s in
                         (("default", 0.060), ("chunk128", 0.050), ("SASRec", 0.030))],
                   summary={"default": dict(ms_per_batch=60.0, epoch_s=57.5, peak_gib=9.0),
                            "chunk128": dict(ms_per_batch=50.0, epoch_s=47.9, peak_gib=8.0),
                            "SASRec": dict(ms_per_batch=30.0, epoch_s=28.8, peak_gib=12.0)})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in bench.markdown(results).splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["chunk128"][1] == "chunk_size=128"
    assert rows["chunk128"][6:] == ["0.833", "1.667"]
    assert rows["default"][6:] == ["1.000", "2.000"]
    assert rows["SASRec"][6:] == ["0.500", ""]
