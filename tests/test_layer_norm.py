"""ssd4rec.modules.layer_norm: the manual LayerNorm path (forced on CPU) against nn.LayerNorm,
dispatch, state_dict compatibility and the replacement helper."""

import pytest
import torch
from recbole.model.layers import TransformerEncoder
from torch import nn

from ssd4rec.modules.layer_norm import LayerNorm, layer_norm, replace_layer_norms

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _pair(width, dtype, affine, eps=1e-5, seed=0):
    torch.manual_seed(seed)
    ref = nn.LayerNorm(width, eps=eps, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.normal_(1.0, 0.5)
            ref.bias.normal_(0.0, 0.5)
    ours = LayerNorm(width, eps=eps, elementwise_affine=affine, dtype=dtype, manual=True)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _forward_backward(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + ([p.grad for p in (module.weight, module.bias)] if module.weight is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("width", [50, 3, 64])
def test_manual_path_matches_nn_layer_norm(width, dtype, affine):
    ref, ours = _pair(width, dtype, affine, eps=1e-12 if width == 50 else 1e-5)
    x = torch.randn(4, 7, width, dtype=dtype) * 3 + 1.5
    dy = torch.randn(4, 7, width, dtype=dtype)
    y_ref, g_ref = _forward_backward(ref, x, dy)
    y, g = _forward_backward(ours, x, dy)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert len(g) == len(g_ref) == (3 if affine else 1)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_manual_path_is_the_custom_function_and_saves_only_x_mean_rstd():
    ours = LayerNorm(50, manual=True)
    x = torch.randn(8, 9, 50, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(x)
    assert type(y.grad_fn).__name__ == "_LayerNormFnBackward"
    params = {id(p) for p in ours.parameters()}
    kept = [t for t in saved if id(t) not in params]
    # x itself, and mean and rstd (8, 9, 1) each: the native op's memory
    assert sorted(t.numel() for t in kept) == [72, 72, x.numel()]
    assert any(t is x for t in kept)


def test_manual_path_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, (5, 6), w, b, 1e-5, manual=True), (x, w, b))


def test_manual_path_bf16_returns_bf16():
    ref, ours = _pair(50, torch.float32, True)
    x = torch.randn(64, 50).to(torch.bfloat16)
    dy = torch.randn(64, 50).to(torch.bfloat16)
    y, g = _forward_backward(ours, x, dy)
    y_ref, g_ref = _forward_backward(ref, x.float(), dy.float())  # float32 maths on the same inputs
    assert y.dtype == torch.bfloat16 and g[0].dtype == torch.bfloat16
    assert g[1].dtype == g[2].dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g[0].float(), g_ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g[1], g_ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g[2], g_ref[2], rtol=1e-4, atol=1e-4)


def test_cpu_dispatch_is_nn_layer_norm_bit_for_bit():
    ref, _ = _pair(50, torch.float32, True)
    ours = LayerNorm(50)  # auto: F.layer_norm on CPU
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 50)
    assert torch.equal(ours(x), ref(x))


def test_state_dict_and_constructor_match_nn_layer_norm():
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-12}):
        ref, ours = nn.LayerNorm(50, **kwargs), LayerNorm(50, **kwargs)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert ours.eps == ref.eps and ours.normalized_shape == ref.normalized_shape
        assert ours.elementwise_affine == ref.elementwise_affine
        assert (ours.bias is None) == (ref.bias is None)
        ours.load_state_dict(ref.state_dict())  # strict
    ref = nn.LayerNorm(3, bias=False)
    ours = LayerNorm(3, bias=False, manual=True)
    x = torch.randn(2, 3)
    torch.testing.assert_close(ours(x), ref(x))


def _encoder():
    torch.manual_seed(0)
    return TransformerEncoder(n_layers=2, n_heads=2, hidden_size=50, inner_size=200, hidden_dropout_prob=0.0,
                              attn_dropout_prob=0.0, hidden_act="gelu", layer_norm_eps=1e-12).eval()


@pytest.mark.parametrize("manual", [None, True], ids=["auto", "forced"])
def test_replace_layer_norms_in_transformer_encoder(manual):
    encoder = _encoder()
    n_plain = sum(type(m) is nn.LayerNorm for m in encoder.modules())
    assert n_plain == 4  # attention and FFN, per layer
    keys = list(encoder.state_dict())
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.randn(3, 9, 50)
    mask = torch.zeros(1, 1, 9, 9)
    with torch.no_grad():
        before = encoder(x, mask, output_all_encoded_layers=False)[-1]
    params = {id(p) for p in encoder.parameters()}
    assert replace_layer_norms(encoder, manual=manual) is encoder
    assert sum(type(m) is nn.LayerNorm for m in encoder.modules()) == 0
    assert sum(type(m) is LayerNorm for m in encoder.modules()) == n_plain
    assert list(encoder.state_dict()) == keys
    assert {id(p) for p in encoder.parameters()} == params  # the same Parameter objects
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(not m.training for m in encoder.modules())
    with torch.no_grad():
        after = encoder(x, mask, output_all_encoded_layers=False)[-1]
    if manual is None:
        assert torch.equal(after, before)
    else:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_replace_layer_norms_on_a_layer_norm_itself():
    ref = nn.LayerNorm(7, eps=1e-6, elementwise_affine=False)
    new = replace_layer_norms(ref)
    assert type(new) is LayerNorm and new.eps == 1e-6 and new.weight is None and new.bias is None


BACKBONE_CONFIG = {"hidden_size": 50, "num_layers": 2, "inner_size": 200, "dropout_prob": 0.0,
                   "attn_dropout_prob": 0.0, "n_heads": 2, "layer_norm_eps": 1e-12, "backend": "torch",
                   "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 25, "chunk_size": 8}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["ssd", "mamba", "sasrec", "linrec"])
def test_lifelong_backbones_use_it_and_the_manual_path_changes_nothing(name, monkeypatch):
    """Every LayerNorm of every LifelongRec backbone (RecBole's and Mamba4Rec's included) is
    ours; forcing the manual path everywhere gives the same outputs and gradients."""
    from ssd4rec.modules import layer_norm as layer_norm_module
    from ssd4rec.modules.lifelong_backbones import build_backbone
    from ssd4rec.modules.segments import Segments

    torch.manual_seed(0)
    backbone = build_backbone(name, BACKBONE_CONFIG, 20)
    norms = [m for m in backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 4 and all(type(m) is LayerNorm for m in norms)
    lengths = torch.tensor([13, 7, 1])
    seg = Segments(lengths, 21, 13)
    e = torch.randn(21, 50)

    def run():
        backbone.zero_grad(set_to_none=True)
        x = e.clone().requires_grad_(True)
        y, _ = backbone(x, seg.position, seg)
        y.backward(torch.ones_like(y) + torch.arange(50.0) / 50)
        return [y.detach(), x.grad] + [p.grad for p in backbone.parameters()]

    auto = run()
    monkeypatch.setattr(layer_norm_module, "FORCE_MANUAL", True)
    forced = run()
    assert len(auto) == len(forced)
    for a, b in zip(auto, forced):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
