"""Mamba4Rec: training moves, padding is invisible, the Mamba block matches mamba_ssm's."""

import importlib
import sys
import types

import pytest
import torch

from ssd4rec.models.mamba4rec import Mamba4Rec, MambaBlock

N_ITEMS = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeDataset:
    def num(self, field):
        assert field == "item_id"
        return N_ITEMS


def make_config(**overrides):
    config = {
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length",
        "NEG_PREFIX": "neg_",
        "MAX_ITEM_LIST_LENGTH": 12,
        "device": torch.device("cpu"),
        "hidden_size": 16,
        "num_layers": 2,
        "d_state": 8,
        "d_conv": 4,
        "expand": 2,
        "dropout_prob": 0.2,
        "loss_type": "CE",
        "layer_norm_eps": 1e-12,
        "backend": "torch",
    }
    config.update(overrides)
    return config


def make_batch(lengths, L, gen):
    """Right-padded histories whose target follows a simple rule (next = last + 1)."""
    seq = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        start = int(torch.randint(1, N_ITEMS - n - 1, (1,), generator=gen))
        seq[i, :n] = torch.arange(start, start + n)
    lengths = torch.tensor(lengths)
    target = seq[torch.arange(len(seq)), lengths - 1] + 1
    return {"item_id_list": seq, "item_length": lengths, "item_id": target}


@pytest.mark.parametrize("num_layers", [1, 2])
def test_training_lowers_the_loss(num_layers):
    torch.manual_seed(0)
    model = Mamba4Rec(make_config(num_layers=num_layers), FakeDataset())
    gen = torch.Generator().manual_seed(1)
    batch = make_batch([3, 7, 12, 1, 5, 9, 2, 11], 12, gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = model.calculate_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # every parameter of the Mamba block receives a gradient
    for name, p in model.named_parameters():
        if name != "item_embedding.weight":
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_right_padding_does_not_change_the_output():
    torch.manual_seed(0)
    model = Mamba4Rec(make_config(num_layers=2), FakeDataset()).eval()
    gen = torch.Generator().manual_seed(2)
    short = make_batch([3, 6, 1, 6], 6, gen)
    long = dict(short)
    long["item_id_list"] = torch.cat([short["item_id_list"], torch.zeros(4, 9, dtype=torch.long)], 1)
    junk = dict(long)  # even real items after the end stay invisible: the model is causal
    junk["item_id_list"] = long["item_id_list"].clone()
    for i, n in enumerate(short["item_length"].tolist()):
        junk["item_id_list"][i, n:] = torch.randint(1, N_ITEMS, (15 - n,), generator=gen)
    with torch.no_grad():
        out = [model.full_sort_predict(b) for b in (short, long, junk)]
        scores = [model.predict(b) for b in (short, long, junk)]
    assert out[0].shape == (4, N_ITEMS)
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2], out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[2], scores[0], rtol=1e-5, atol=1e-6)
    # predict is the full-sort score of the target item
    torch.testing.assert_close(scores[0], out[0].gather(1, short["item_id"][:, None]).squeeze(1))


# mamba_ssm.modules.mamba_simple.Mamba(d_model=64, d_state=32, d_conv=4, expand=2), read from
# its definition: d_inner 128, dt_rank ceil(64 / 16) = 4, conv_bias True, bias False.
MAMBA_SSM_SHAPES = {
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 2 * 32, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "A_log": (128, 32),
    "D": (128,),
    "out_proj.weight": (64, 128),
}


def test_block_state_dict_matches_mamba_ssm_definition():
    block = MambaBlock(d_model=64, d_state=32, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == MAMBA_SSM_SHAPES
    # mamba_ssm's init: A = -[1..n] per channel, D = 1, softplus(dt bias) in [1e-3, 0.1]
    torch.testing.assert_close(torch.exp(block.A_log.detach()), torch.arange(1, 33.0).repeat(128, 1))
    assert torch.equal(block.D, torch.ones(128))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    # and the model's layers use exactly these names under mamba_layers.<i>.mamba.
    model = Mamba4Rec(make_config(hidden_size=64, num_layers=1, d_state=32), FakeDataset())
    inner = {k.split("mamba_layers.0.mamba.", 1)[1]: tuple(v.shape)
             for k, v in model.state_dict().items() if k.startswith("mamba_layers.0.mamba.")}
    assert inner == MAMBA_SSM_SHAPES


def test_bad_loss_type():
    from ssd4rec.errors import SSD4RecError

    with pytest.raises(SSD4RecError, match="loss_type"):
        Mamba4Rec(make_config(loss_type="BPR"), FakeDataset())


def _import_mamba_simple():
    """mamba_ssm's Mamba module, importable without its Mamba-1 CUDA extension (mamba_ssm
    2.3.2 imports ``selective_scan_cuda`` unconditionally); None when mamba_ssm is missing."""
    placeholder = None
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    try:
        try:
            import selective_scan_cuda  # noqa: F401
        except ModuleNotFoundError:
            placeholder = types.ModuleType("selective_scan_cuda")
            sys.modules["selective_scan_cuda"] = placeholder
        return importlib.import_module("mamba_ssm.modules.mamba_simple")
    except ImportError:
        return None
    finally:
        if placeholder is not None and sys.modules.get("selective_scan_cuda") is placeholder:
            del sys.modules["selective_scan_cuda"]


def test_block_matches_mamba_ssm_mamba(monkeypatch):
    """Same weights, same output as mamba_ssm's Mamba (its non-fused path, with its own
    reference scan standing in for the CUDA one where the extension is missing)."""
    mamba_simple = _import_mamba_simple()
    if mamba_simple is None:
        pytest.skip("mamba_ssm is not installed")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if importlib.util.find_spec("selective_scan_cuda") is None:
        monkeypatch.setattr(mamba_simple, "selective_scan_fn", selective_scan_ref)
    if device == "cpu":
        monkeypatch.setattr(mamba_simple, "causal_conv1d_fn", None)
    torch.manual_seed(0)
    theirs = mamba_simple.Mamba(d_model=64, d_state=32, d_conv=4, expand=2, use_fast_path=False).to(device)
    ours = MambaBlock(d_model=64, d_state=32, d_conv=4, expand=2).to(device)
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == MAMBA_SSM_SHAPES
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 17, 64, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
