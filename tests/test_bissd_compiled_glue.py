"""compile_glue for SSD4Rec: the Bi-SSD layers' glue through torch.compile equals eager.

CPU tests with the "aot_eager" backend (the graphs inductor would get, no code generation),
through the recording fixtures of tests/test_compiled_glue.py: something was compiled, and the
scan and the convolution never ran inside a compiled region. Inductor itself is left to the GPU
session's benchmark (``scripts/benchmark.py --ssd-set compile_glue=true``).
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from ssd4rec.config import collect_values, parse_overrides
from ssd4rec.data.packing import cu_seqlens_from_lengths
from ssd4rec.errors import SSD4RecError
from ssd4rec.models import ssd4rec as ssd4rec_model
from ssd4rec.models.ssd4rec import SSD4Rec
from ssd4rec.modules import BiSSDEncoder
from tests.lifelong_support import FakeDataset, make_batch, make_config
from tests.test_compiled_glue import external_ops_eager, graphs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [1, 5, 8, 13, 2, 17]  # T = 46; chunk_size 8: sequences cross chunk edges, and one is a single token
D_MODEL = 16


def make_encoders(shared, align, dropout=0.0, dtype=torch.float64):
    """(eager, compiled) encoders with the same random weights (not a fresh init's: every path
    carries signal) and an out_proj bias (the shared path's (1 + beta) * bias term)."""
    torch.manual_seed(0)
    args = dict(d_model=D_MODEL, num_layers=2, d_state=8, headdim=8, chunk_size=8, dropout=dropout, beta=0.3,
                shared_directions=shared, align_backward=align, backend="torch")
    eager, compiled = BiSSDEncoder(**args), BiSSDEncoder(compile_glue=True, **args)
    for encoder in (eager, compiled):
        for layer in encoder.layers:
            for mixer in {layer.forward_ssd, layer.backward_ssd}:
                mixer.out_proj.bias = nn.Parameter(torch.zeros(D_MODEL))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.3 * torch.randn_like(p))
    compiled.load_state_dict(eager.state_dict())
    return eager.to(dtype), compiled.to(dtype)


def packed_input(dtype=torch.float64):
    """x: (T, d_model) needing a gradient, cu_seqlens: (B+1,), each sequence's last row: (B,)."""
    cu_seqlens = cu_seqlens_from_lengths(torch.tensor(LENGTHS))
    x = torch.randn(int(cu_seqlens[-1]), D_MODEL, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x.requires_grad_(), cu_seqlens, cu_seqlens[1:] - 1


def output_and_grads(encoder, x, cu_seqlens, keep):
    """(output, grad of x, {name: grad of the parameter}) of a fixed weighted sum of the output."""
    encoder.zero_grad()
    x.grad = None
    out = encoder(x, cu_seqlens, output_index=keep)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), x.grad.clone(), {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize("keep", [False, True], ids=["all-rows", "keep-index"])
@pytest.mark.parametrize("align", [False, True], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_compiled_glue_equals_eager(shared, align, keep, graphs, external_ops_eager):
    """Training mode, dropout 0, float64: output, the input's gradient and every parameter's."""
    eager, compiled = make_encoders(shared, align)
    x, cu_seqlens, last = packed_input()
    keep = last if keep else None
    out_e, dx_e, grads_e = output_and_grads(eager, x, cu_seqlens, keep)
    external_ops_eager.clear()
    out_c, dx_c, grads_c = output_and_grads(compiled, x, cu_seqlens, keep)
    tight = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out_c, out_e, **tight)
    torch.testing.assert_close(dx_c, dx_e, **tight)
    assert grads_c.keys() == grads_e.keys()
    # Aligned, the last layer's backward output at a sequence's last token has read that token
    # alone, from a zero state: no decay acts, so the unshared backward mixer's A_log gets none.
    silent = {"layers.1.backward_ssd.A_log"} if (align and keep is not None and not shared) else set()
    for name in grads_e:
        assert (grads_e[name].abs().max() > 0) != (name in silent), f"{name}: gradient zero or not as expected"
        torch.testing.assert_close(grads_c[name], grads_e[name], **tight, msg=name)
    assert graphs, "nothing was compiled"
    assert external_ops_eager and not any(external_ops_eager), "the scan or conv ran in a compiled region"


def test_eval_mode_turns_the_compiled_dropout_off(graphs):
    """dropout 0.3 in eval mode: no mask drawn, the same output as eager; in training mode the
    compiled dropout does act (the output changes)."""
    eager, compiled = make_encoders(True, False, dropout=0.3)
    x, cu_seqlens, last = packed_input()
    eager.eval(), compiled.eval()
    with torch.no_grad():
        reference = eager(x, cu_seqlens, output_index=last)
        torch.testing.assert_close(compiled(x, cu_seqlens, output_index=last), reference, rtol=1e-9, atol=1e-11)
        compiled.train()
        assert not torch.allclose(compiled(x, cu_seqlens, output_index=last), reference)
    assert graphs, "nothing was compiled"


# --------------------------------------------------------------------------------------------
# The SSD4Rec model
# --------------------------------------------------------------------------------------------
def model_config(**overrides):
    """The small CPU SSD4Rec (tests.lifelong_support's sizes) with SSD4Rec's own keys."""
    keys = dict(beta=0.3, maskratio=0.0, norm_embedding=True, shared_directions=True, align_backward=False)
    keys.update(overrides)
    return make_config(**keys)


def model_batch():
    store, interaction = make_batch([7, 12, 3, 1])
    interaction["item_id"] = store[interaction["history_end"]]  # each history's target
    return store, interaction


def loss_grads_scores(model, interaction):
    model.train()
    model.zero_grad()
    loss = model.calculate_loss(interaction)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        return loss.detach(), grads, model.full_sort_predict(interaction)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_model_with_compiled_glue_equals_eager(shared, graphs):
    """Loss, every parameter's gradient (the embedding norm's included), eval scores; float32."""
    store, interaction = model_batch()
    torch.manual_seed(0)
    eager = SSD4Rec(model_config(shared_directions=shared), FakeDataset(store))
    compiled = SSD4Rec(model_config(shared_directions=shared, compile_glue=True), FakeDataset(store))
    assert (eager.compile_glue, compiled.compile_glue) == (False, True)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled.load_state_dict(eager.state_dict())
    (loss_e, grads_e, scores_e), (loss_c, grads_c, scores_c) = (
        loss_grads_scores(eager, interaction), loss_grads_scores(compiled, interaction))
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, **close)
    assert grads_c.keys() == grads_e.keys() and "emb_layer_norm.weight" in grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], **close, msg=name)
    torch.testing.assert_close(scores_c, scores_e, **close)
    assert graphs, "nothing was compiled"


def test_state_dict_is_the_same_with_compile_glue_on_or_off():
    store, _ = model_batch()
    on = SSD4Rec(model_config(compile_glue=True), FakeDataset(store)).state_dict()
    off = SSD4Rec(model_config(compile_glue=False), FakeDataset(store)).state_dict()
    assert on.keys() == off.keys()
    assert all(on[name].shape == off[name].shape for name in on)


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("auto", False), (None, False),
                                             ("absent", False)])
def test_compile_glue_values(value, expected):
    """true/false; auto is off on the CPU; null or absent: the default, off (not yet measured
    on a GPU). The encoder's layers get the same setting."""
    store, _ = model_batch()
    config = model_config() if value == "absent" else model_config(compile_glue=value)
    model = SSD4Rec(config, FakeDataset(store))
    assert model.compile_glue is expected
    assert all(layer.compile_glue is expected for layer in model.encoder.layers)


def test_compile_glue_auto_is_on_for_cuda():
    """The device only decides; nothing is moved to it while the model is built."""
    store, _ = model_batch()
    model = SSD4Rec(model_config(compile_glue="auto", device=torch.device("cuda")), FakeDataset(store))
    assert model.compile_glue is True


@pytest.mark.parametrize("value", ["yes", 1, "on"])
def test_bad_compile_glue_names_the_key(value):
    store, _ = model_batch()
    with pytest.raises(SSD4RecError, match=r"'compile_glue': expected true, false or auto"):
        SSD4Rec(model_config(compile_glue=value), FakeDataset(store))


@pytest.mark.parametrize("text, expected", [("true", True), ("false", False), ("auto", "auto")])
def test_benchmark_ssd_set_reaches_the_config(text, expected):
    """scripts/benchmark.py turns each --ssd-set KEY=VALUE into an override with parse_overrides
    and merges it with collect_values; compile_glue arrives as the model reads it."""
    overrides = parse_overrides([f"--compile_glue={text}"])
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", {"dataset": "ml-100k", **overrides})
    assert values["compile_glue"] == expected and type(values["compile_glue"]) is type(expected)


def test_config_yaml_compiles_the_glue_on_cuda_only():
    """auto since its inductor test passed on a GPU: config.yaml says so, and the model's default agrees."""
    values, _ = collect_values(ROOT / "config.yaml", ROOT / "datasets", {"dataset": "ml-100k"})
    assert values["compile_glue"] == "auto"
    assert ssd4rec_model.COMPILE_GLUE == "auto"  # the model's default for a config without the key
    store, _ = model_batch()
    assert SSD4Rec(model_config(), FakeDataset(store)).compile_glue is False  # CPU: eager
