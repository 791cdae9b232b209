"""Packing is exact: the Bi-SSD encoder on a packed batch equals it on each sequence alone."""

import pytest
import torch

from ssd4rec.data.packing import cu_seqlens_from_lengths, segment_layout
from ssd4rec.modules import BiSSDEncoder, Mamba2Mixer


def make_encoder(shared, align, seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=32, num_layers=2, d_state=16, headdim=8, chunk_size=8, dropout=0.0, beta=0.1)
    args.update(kwargs)
    encoder = BiSSDEncoder(shared_directions=shared, align_backward=align, **args)
    # Random (not freshly initialised) weights, so every path carries signal.
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder.eval()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("align", [True, False])
def test_packed_equals_each_sequence_alone(shared, align):
    encoder = make_encoder(shared, align)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 5, 8, 13, 2, 17, 1, 9])  # crosses chunk edges (chunk_size 8)
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    x = torch.randn(int(cu_seqlens[-1]), 32, generator=generator)

    with torch.no_grad():
        packed = encoder(x, cu_seqlens)
        for b in range(len(lengths)):
            start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
            alone = encoder(x[start:end], torch.tensor([0, end - start]))
            assert (packed[start:end] - alone).abs().max() < 1e-5, f"sequence {b} differs"


def test_align_backward_decides_reversal_symmetry():
    """With beta=1 and one shared mixer, an aligned layer is reversal-equivariant:
    layer(reverse(x)) == reverse(layer(x)). The official, unaligned one is not."""
    lengths = torch.tensor([6, 11])
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    _, _, reverse_index = segment_layout(cu_seqlens)
    x = torch.randn(int(cu_seqlens[-1]), 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for align, symmetric in ((True, True), (False, False)):
            encoder = make_encoder(True, align, beta=1.0, num_layers=1)
            gap = (encoder(x[reverse_index], cu_seqlens) - encoder(x, cu_seqlens)[reverse_index]).abs().max()
            assert (gap < 1e-5) == symmetric, (align, float(gap))


def test_gradients_do_not_cross_sequences():
    encoder = make_encoder(True, False)
    cu_seqlens = torch.tensor([0, 7, 19])
    x = torch.randn(19, 32, requires_grad=True)
    encoder(x, cu_seqlens)[:7].sum().backward()
    assert x.grad[:7].abs().sum() > 0
    assert torch.all(x.grad[7:] == 0)


def test_mixer_parameters_match_mamba_ssm_mamba2():
    """Names and shapes of mamba_ssm.modules.mamba2.Mamba2(d_model=256, d_state=64,
    d_conv=4, expand=2, headdim=16): d_inner 512, 32 heads, conv over x, B and C."""
    mixer = Mamba2Mixer(256, d_state=64, d_conv=4, expand=2, headdim=16)
    shapes = {name: tuple(p.shape) for name, p in mixer.state_dict().items()}
    assert shapes == {
        "dt_bias": (32,),
        "A_log": (32,),
        "D": (32,),
        "in_proj.weight": (2 * 512 + 2 * 64 + 32, 256),
        "conv1d.weight": (512 + 2 * 64, 1, 4),
        "conv1d.bias": (512 + 2 * 64,),
        "norm.weight": (512,),
        "out_proj.weight": (256, 512),
    }


def test_bf16_autocast_forward_and_backward():
    """Under bf16 autocast the scan stays in float32 and the gradient reaches the input."""
    encoder = make_encoder(True, False, num_layers=1)
    cu_seqlens = torch.tensor([0, 3, 8, 17])
    x = torch.randn(17, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with torch.no_grad():
        reference = encoder(x, cu_seqlens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = encoder(x, cu_seqlens)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # bf16 matmuls around the scan: agreement to bf16's ~3 significant digits.
    assert (y.float() - reference).abs().max() < 5e-2


def reference_layer(layer, x, seq_idx, reverse_index):
    """A Bi-SSD layer spelled out from its definition: each direction a whole mixer call
    (its own in_proj and out_proj), the backward one on the reversed stream."""
    fwd = layer.forward_ssd(x[None], seq_idx[None])[0]
    bwd = layer.backward_ssd(x[reverse_index][None], seq_idx[None])[0]
    if layer.align_backward:
        bwd = bwd[reverse_index]
    return layer.ffn(layer.dropout(layer.layer_norm(fwd + layer.beta * bwd + x)))


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_shared_fast_path_equals_definition(align, bias):
    """One in_proj reversed and one out_proj on the summed directions (plus the last layer
    run on the kept rows only) equal two full mixer calls, for values and gradients."""
    encoder = make_encoder(True, align).double()
    if bias:  # out_proj with a bias takes it (1 + beta) times
        for layer in encoder.layers:
            mixer = layer.forward_ssd
            mixer.out_proj.bias = torch.nn.Parameter(torch.randn(mixer.d_model, dtype=torch.float64))
    lengths = torch.tensor([3, 9, 1, 12, 6])
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    seq_idx, _, reverse_index = segment_layout(cu_seqlens)
    last_index = cu_seqlens[1:] - 1
    x = torch.randn(int(cu_seqlens[-1]), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    x_fast = x.clone().requires_grad_()
    fast = encoder(x_fast, cu_seqlens, output_index=last_index)
    x_ref = x.clone().requires_grad_()
    h = x_ref
    for layer in encoder.layers:
        h = reference_layer(layer, h, seq_idx, reverse_index)
    ref = h[last_index]
    assert fast.shape == ref.shape == (len(lengths), 32)
    assert (fast - ref).abs().max() < 1e-10

    weights = torch.randn_like(ref)
    params = [p for p in encoder.parameters()]
    g_fast = torch.autograd.grad((fast * weights).sum(), [x_fast] + params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * weights).sum(), [x_ref] + params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= 1e-10 * (1 + b.abs().max())
