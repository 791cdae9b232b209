"""TiM4Rec: time gaps, the TiSSD mixer, and the model in its packed and faithful modes."""

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ssd4rec.data.packing import cu_seqlens_from_lengths, history_bounds, pack_batch, segment_layout
from ssd4rec.data.time_gaps import scale_gaps, segment_normalize, time_gaps
from ssd4rec.errors import SSD4RecError
from ssd4rec.models.tim4rec import TIM4REC_DEFAULTS, PaddedBatch, TiM4Rec, pad_batch
from ssd4rec.modules import Mamba2Mixer
from ssd4rec.modules.tissd import TiSSD

DAY = 86400.0


# ------------------------------------------------------------------------------------------
# Fixtures: a CSR history store with real-world time patterns, a stub config and dataset.
# ------------------------------------------------------------------------------------------
def random_store(num_users=10, max_len=14, n_items=30, seed=0):
    """Histories laid out as the dataset stores them, with ties, day-granular users
    (multiples of a day, as Amazon) and gaps of years, all in float64 unix seconds."""
    rng = random.Random(seed)
    users, items, times = [], [], []
    for user in range(num_users):
        length = rng.randint(2, max_len)
        t = 9.5e8 + rng.uniform(0, 3e8)
        if user % 3 == 1:
            t = math.floor(t / DAY) * DAY
        for _ in range(length):
            users.append(user)
            items.append(rng.randint(1, n_items - 1))
            times.append(t)
            kind = rng.random()
            if user % 3 == 1:  # day granularity: same day or whole days later
                t += DAY * rng.choice([0, 0, 1, 2, 30, 400])
            elif kind < 0.3:
                pass  # equal timestamps
            elif kind < 0.9:
                t += rng.uniform(1, 5e5)
            else:
                t += rng.uniform(1e8, 5e8)  # years
    return torch.tensor(users), torch.tensor(items), torch.tensor(times, dtype=torch.float64)


class StoreDataset:
    """What TiM4Rec reads of a PackedSequentialDataset."""

    def __init__(self, items, times, n_items=30):
        self.items, self.times, self.n_items = items, times, n_items

    def num(self, field):
        return self.n_items

    def history_store(self):
        return self.items, self.times


def make_config(**overrides):
    config = dict(
        USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", LIST_SUFFIX="_list",
        ITEM_LIST_LENGTH_FIELD="item_length", NEG_PREFIX="neg_", device="cpu",
        MAX_ITEM_LIST_LENGTH=10, hidden_size=32, num_layers=2, d_state=8, d_conv=4, expand=2,
        headdim=16, chunk_size=4, dropout_prob=0.0, time_dropout_prob=0.0, layer_norm_eps=1e-12,
        backend="torch",
    )
    config.update(overrides)
    return config


def make_model(store, seed=0, **overrides):
    torch.manual_seed(seed)
    _, items, times = store
    model = TiM4Rec(make_config(**overrides), StoreDataset(items, times))
    # Random (not freshly initialised) weights, so every path carries signal. At the official
    # init the time branch is nearly silent (time_dt ~ 0, and softplus is flat at dt_bias ~ -5),
    # hence the larger noise there.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.normal_(0.0, 0.5)
            p.add_((0.5 if "time" in name else 0.1) * torch.randn_like(p))
    return model.eval()


def samples(store, max_length=None, count=9, seed=0):
    users, items, _ = store
    history_end, lengths = history_bounds(users, max_length)
    ids = [i for i in range(len(users)) if lengths[i] > 0]
    random.Random(seed).shuffle(ids)
    ids = torch.tensor(ids[:count])
    return history_end[ids], lengths[ids], items[ids]


# ------------------------------------------------------------------------------------------
# Time gaps
# ------------------------------------------------------------------------------------------
def test_time_gaps_on_packed_batch_equal_per_sequence():
    store = random_store(seed=1)
    history_end, lengths, _ = samples(store, count=10)
    packed = pack_batch(store[1], store[2], history_end, lengths)
    gaps = time_gaps(packed.timestamps, packed.seq_idx)
    assert gaps.dtype == torch.float64
    for b in range(len(lengths)):
        start, end = int(packed.cu_seqlens[b]), int(packed.cu_seqlens[b + 1])
        t = packed.timestamps[start:end].tolist()
        expected = [0.0] + [t[i] - t[i - 1] for i in range(1, len(t))]
        assert gaps[start:end].tolist() == expected, f"sequence {b}"
    # Padded rows: one sequence per row, along the last axis.
    rows = torch.tensor([[5.0, 7.0, 7.0, 20.0], [1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    assert time_gaps(rows).tolist() == [[0.0, 2.0, 0.0, 13.0], [0.0, 0.0, 3.0, 0.0]]


def test_equal_timestamps_give_zero():
    t = torch.full((6,), 1.2e9, dtype=torch.float64)
    seq_idx = torch.tensor([0, 0, 0, 1, 1, 1])
    gaps = time_gaps(t, seq_idx)
    assert torch.equal(gaps, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(scale_gaps(gaps), torch.zeros(6, dtype=torch.float64))
    # Per-sequence normalisation of all-zero (or constant) gaps is exactly 0, never NaN.
    x = torch.tensor([[[0.0], [0.0], [0.0], [3.0], [3.0], [3.0]]])
    assert torch.equal(segment_normalize(x, seq_idx[None], 2), torch.zeros_like(x))


def test_day_granularity_and_exact_seconds():
    # Amazon: multiples of a day; the same day is 0 and one day is the same value on every dataset.
    t = 1.3e9 // DAY * DAY + DAY * torch.tensor([0, 0, 1, 3, 3, 368], dtype=torch.float64)
    gaps = time_gaps(t)
    assert gaps.tolist() == [0.0, 0.0, DAY, 2 * DAY, 0.0, 365 * DAY]
    scaled = scale_gaps(gaps, "log1p", 3600.0)
    assert scaled.tolist() == pytest.approx([0.0, 0.0, math.log(25), math.log(49), 0.0, math.log(1 + 365 * 24)])
    # Unix seconds need float64: around 1.4e9 float32 has a 128 s resolution.
    t = 1.4e9 + torch.tensor([0.0, 1.0, 2.0, 62.0], dtype=torch.float64)
    assert time_gaps(t).tolist() == [0.0, 1.0, 1.0, 60.0]
    assert time_gaps(t.float()).tolist() != [0.0, 1.0, 1.0, 60.0]


def test_huge_gaps_stay_finite_and_ordered():
    gaps = torch.tensor([0.0, 1.0, 3600.0, DAY, 365 * DAY, 1e9, 1e12], dtype=torch.float64)
    scaled = scale_gaps(gaps, "log1p", 3600.0).float()
    assert torch.isfinite(scaled).all() and (scaled.diff() > 0).all()
    assert scaled[5] < 13  # 30 years
    assert scale_gaps(torch.tensor([-5.0], dtype=torch.float64)).item() == 0.0  # never NaN
    assert torch.equal(scale_gaps(gaps, "raw"), gaps)
    with pytest.raises(ValueError):
        scale_gaps(gaps, "cube")


def test_segment_normalize_equals_layer_norm_per_sequence():
    lengths = torch.tensor([1, 4, 7, 2])
    cu = cu_seqlens_from_lengths(lengths)
    seq_idx, _, _ = segment_layout(cu)
    x = torch.randn(1, int(cu[-1]), 3, dtype=torch.float64) * 1e3 + 5e3
    out = segment_normalize(x, seq_idx[None], len(lengths))
    for b in range(len(lengths)):
        s, e = int(cu[b]), int(cu[b + 1])
        expected = F.layer_norm(x[0, s:e].T, (e - s,), eps=1e-5).T
        assert torch.allclose(out[0, s:e], expected, atol=1e-9)


# ------------------------------------------------------------------------------------------
# TiSSD
# ------------------------------------------------------------------------------------------
def mixer_pair(**kwargs):
    args = dict(d_model=32, d_state=8, headdim=16, chunk_size=4, bias=True, backend="torch")
    args.update(kwargs)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(**args)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tissd = TiSSD(**args, time_aware=True, time_mode="packed")
    missing, unexpected = tissd.load_state_dict(mixer.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("time_") for k in missing)
    return mixer.eval(), tissd.eval()


def packed_input(lengths=(3, 9, 1, 6), d=32, seed=0):
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    seq_idx, _, _ = segment_layout(cu)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, int(cu[-1]), d, generator=g), seq_idx[None], len(lengths)


def test_tissd_without_time_is_exactly_mamba2():
    mixer, tissd = mixer_pair()
    u, seq_idx, n = packed_input()
    expected = mixer(u, seq_idx)
    out, next_time = tissd(u, seq_idx)  # time branch off: no time input
    assert next_time is None and torch.equal(out, expected)
    plain = TiSSD(d_model=32, d_state=8, headdim=16, chunk_size=4, bias=True, backend="torch", time_aware=False)
    plain.load_state_dict(mixer.state_dict())  # strict: the same parameters, no others
    time = torch.randn(1, u.shape[1], tissd.nheads)
    assert torch.equal(plain(u, seq_idx, time, n)[0], expected)
    # The time path shares everything else: a unit time step gives Mamba2 again.
    tissd.time_step = lambda time_diff, seq_idx=None: torch.ones_like(time_diff)
    assert torch.equal(tissd(u, seq_idx, time, n)[0], expected)


def test_tissd_time_changes_output_and_respects_sequences():
    _, tissd = mixer_pair()
    u, seq_idx, n = packed_input()
    time = torch.randn(1, u.shape[1], tissd.nheads)
    out, next_time = tissd(u, seq_idx, time, n)
    assert not torch.allclose(out, tissd(u, seq_idx)[0])
    assert next_time.shape == time.shape
    # Perturbing the time input of the second sequence changes nothing in the others.
    bumped = time.clone()
    bumped[:, 3:12] += 1.0
    out2, next2 = tissd(u, seq_idx, bumped, n)
    keep = torch.ones(u.shape[1], dtype=torch.bool)
    keep[3:12] = False
    assert torch.allclose(out2[:, keep], out[:, keep], atol=1e-6)
    assert torch.allclose(next2[:, keep], next_time[:, keep], atol=1e-6)
    assert not torch.allclose(out2[:, ~keep], out[:, ~keep])


# ------------------------------------------------------------------------------------------
# The model, packed mode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_packed_model_equals_each_sequence_alone(num_layers):
    store = random_store(seed=2)
    model = make_model(store, num_layers=num_layers)
    history_end, lengths, targets = samples(store, count=9)
    with torch.no_grad():
        packed = model(pack_batch(model.history_item, model.history_time, history_end, lengths))
        for b in range(len(lengths)):
            alone = model(pack_batch(model.history_item, model.history_time, history_end[b:b + 1], lengths[b:b + 1]))
            assert (packed[b] - alone[0]).abs().max() < 1e-4, f"sequence {b}"


@pytest.mark.parametrize("mode", ["packed", "faithful"])
def test_gradients_reach_every_time_parameter(mode):
    store = random_store(seed=3)
    model = make_model(store, tim4rec_mode=mode, num_layers=3, dropout_prob=0.1, time_dropout_prob=0.1).train()
    history_end, lengths, targets = samples(store, max_length=10, count=12)
    loss = model.calculate_loss({"history_end": history_end, "item_length": lengths, "item_id": targets})
    loss.backward()
    time_params = [n for n, _ in model.named_parameters() if "time" in n]
    assert len(time_params) >= 2 + 3 * 6  # input norm; per layer: MLP, 2 convs, (gate, norm)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The last layer produces no time input for a next one, so it has no gate or norm.
    assert not hasattr(model.layers[-1].mixer, "time_gate")


def test_packed_model_uses_the_time_gaps():
    store = random_store(seed=4)
    model = make_model(store)
    history_end, lengths, _ = samples(store, count=6)
    batch = pack_batch(model.history_item, model.history_time, history_end, lengths)
    with torch.no_grad():
        out = model(batch)
        shifted = model(pack_batch(model.history_item, model.history_time + 1e6, history_end, lengths))
        assert torch.allclose(out, shifted, atol=1e-5)  # only gaps matter, not absolute times
        # Another pattern of gaps (a uniform rescaling would change little: the gaps are
        # standardised per sequence, as by the official LayerNorm over positions).
        batch.timestamps = torch.arange(len(batch.timestamps), dtype=torch.float64).pow(3) * 60.0
        assert not torch.allclose(out, model(batch), atol=1e-4)


# ------------------------------------------------------------------------------------------
# The model, faithful mode
# ------------------------------------------------------------------------------------------
def test_pad_batch_keeps_the_last_items_right_padded():
    items = torch.tensor([11, 12, 13, 14, 15, 16])
    times = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)
    history_end, lengths = torch.tensor([5, 2]), torch.tensor([5, 2])
    batch = pad_batch(items, times, history_end, lengths, 3)
    assert batch.items.tolist() == [[13, 14, 15], [11, 12, 0]]
    assert batch.lengths.tolist() == [3, 2]
    assert batch.timestamps.tolist() == [[4.0, 8.0, 16.0], [1.0, 2.0, 2.0]]  # padding: gap 0
    official = pad_batch(items, times, history_end, lengths, 3, time_padding="official")
    assert official.timestamps.tolist() == [[4.0, 8.0, 16.0], [1.0, 2.0, 0.0]]


def test_faithful_runs_and_padding_items_never_reach_the_last_position():
    store = random_store(seed=5)
    model = make_model(store, tim4rec_mode="faithful")
    history_end, lengths, targets = samples(store, max_length=10, count=8)
    interaction = {"history_end": history_end, "item_length": lengths, "item_id": targets}
    model.train()
    model.calculate_loss(interaction).backward()
    model.eval()
    assert model.full_sort_predict(interaction).shape == (len(lengths), 30)

    batch = model.make_batch(interaction)
    assert batch.items.shape == (len(lengths), 10)
    pad = torch.arange(10)[None, :] >= batch.lengths[:, None]
    assert pad.any()
    with torch.no_grad():
        out = model(batch)
        other_items = PaddedBatch(batch.items.masked_fill(pad, 7), batch.timestamps, batch.lengths)
        assert torch.allclose(model(other_items), out, atol=1e-6)
        # The position-axis time layers (Linear(L, L), LayerNorm(L)) read the padding's gaps:
        # in the official architecture they change the last real position (documented).
        other_times = PaddedBatch(batch.items, torch.where(pad, batch.timestamps + 5e5, batch.timestamps), batch.lengths)
        assert (model(other_times) - out).abs().max() > 1e-4


def test_without_time_faithful_equals_packed():
    """With the time branch off both modes are the same Mamba2 stack: padding changes nothing."""
    store = random_store(seed=6)
    faithful = make_model(store, tim4rec_mode="faithful", time_aware=False)
    packed = make_model(store, tim4rec_mode="packed", time_aware=False, seed=1)
    packed.load_state_dict(faithful.state_dict())  # strict: identical parameters
    history_end, lengths, _ = samples(store, max_length=10, count=8)
    with torch.no_grad():
        a = faithful(pad_batch(faithful.history_item, faithful.history_time, history_end, lengths, 10))
        b = packed(pack_batch(packed.history_item, packed.history_time, history_end, lengths))
    assert torch.allclose(a, b, atol=1e-5)


def test_hardswish_convolutions_and_official_padding_run():
    store = random_store(seed=7)
    model = make_model(store, tim4rec_mode="faithful", conv_activation="hardswish", time_padding="official",
                       p2p_residual=True)
    history_end, lengths, _ = samples(store, max_length=10, count=4)
    with torch.no_grad():
        assert torch.isfinite(model(model.make_batch({"history_end": history_end, "item_length": lengths}))).all()


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
def test_bad_options_name_the_key():
    store = random_store(seed=8)
    for key, value in [("tim4rec_mode", "padded"), ("time_scaling", "log2"), ("time_unit", 0),
                       ("time_aware", "yes"), ("time_dropout_prob", 1.5)]:
        with pytest.raises(SSD4RecError, match=key):
            make_model(store, **{key: value})


def test_yaml_matches_the_model_defaults():
    path = Path(__file__).resolve().parents[1] / "ssd4rec" / "models" / "tim4rec.yaml"
    values = yaml.safe_load(path.read_text())
    assert {k: values[k] for k in TIM4REC_DEFAULTS} == TIM4REC_DEFAULTS
    assert (values["hidden_size"], values["num_layers"], values["d_state"], values["headdim"]) == (64, 2, 32, 32)
    assert values["dataset_overrides"]["ml-1m"]["MAX_ITEM_LIST_LENGTH"] == 200
    assert values["dataset_overrides"]["amazon-beauty"]["MAX_ITEM_LIST_LENGTH"] == 50
