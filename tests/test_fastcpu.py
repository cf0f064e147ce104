"""The fused CPU kernels for `classic` and `modern` compute the plain model's function and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lenet import fastcpu
from lenet.models import classic, lenet5_1998, modern

needs_ext = pytest.mark.skipif(fastcpu.load_extension() is None, reason="no C++ compiler for the kernel")


def _grads(model, run, x, y):
    model.zero_grad(set_to_none=True)
    out = run(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@needs_ext
@pytest.mark.parametrize("batch", [1, 8, 37, 256])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_match_autograd(batch, channels_last):
    torch.manual_seed(batch)
    model = classic()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fast = fastcpu.fast_forward(model)
    x = torch.randn(batch, 1, 28, 28) * 2
    y = torch.randint(0, 10, (batch,))
    ref_out, ref = _grads(model, model, x, y)
    out, got = _grads(model, fast, x, y)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-4 * scale, msg=name)


@needs_ext
def test_training_steps_give_the_same_weights():
    torch.manual_seed(0)
    plain, fused = classic(), classic()
    fused.load_state_dict(plain.state_dict())
    fast = fastcpu.fast_forward(fused)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (plain, fused)]
    for _ in range(5):
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        for run, opt in ((plain, opts[0]), (fast, opts[1])):
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, rtol=0, atol=1e-4, msg=name)
    assert list(fast.net.state_dict()) == list(classic().state_dict())


@needs_ext
def test_a_stale_graph_fails_loudly_instead_of_using_overwritten_activations():
    model = classic()
    fast = fastcpu.fast_forward(model)
    x = torch.randn(16, 1, 28, 28)
    first = fast(x).sum()
    fast(x).sum().backward()  # the second forward reuses the first one's activation buffers
    with pytest.raises(RuntimeError, match="inplace"):
        first.backward()


@needs_ext
def test_inputs_it_cannot_take_go_through_the_plain_model():
    model = classic()
    fast = fastcpu.fast_forward(model)
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _modern_with_trained_looking_norms(seed: int, dropout: float = 0.25) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = modern(dropout)
    with torch.no_grad():  # away from the initial 1 and 0, so that scale and shift both matter
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model


@needs_ext
@pytest.mark.parametrize("batch", [2, 8, 37, 128])
def test_modern_outputs_gradients_and_running_statistics_match_autograd(batch):
    model = _modern_with_trained_looking_norms(batch, dropout=0.0)
    twin = _modern_with_trained_looking_norms(batch, dropout=0.0).double()  # the exact answer, nearly
    fast = fastcpu.fast_forward(model)
    assert isinstance(fast, fastcpu.FastModern)
    x = torch.randn(batch, 1, 28, 28) * 2
    y = torch.randint(0, 10, (batch,))
    ref_out, ref = _grads(twin, twin, x.double(), y)
    out, got = _grads(model, fast, x, y)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-4)
    # batch norm's backward cancels almost all of a tiny batch's gradient: float32 (PyTorch's own path
    # too) keeps fewer correct digits there
    tolerance = 5e-4 if batch < 4 else 2e-5
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name].float(), rtol=0, atol=tolerance * scale, msg=name)
    for name, value in twin.state_dict().items():  # running means and variances, batches tracked
        torch.testing.assert_close(
            model.state_dict()[name], value.to(model.state_dict()[name].dtype), rtol=1e-5, atol=1e-6, msg=name
        )


@needs_ext
def test_modern_training_with_dropout_gives_the_plain_models_weights():
    plain, fused = _modern_with_trained_looking_norms(0), _modern_with_trained_looking_norms(0)
    fast = fastcpu.fast_forward(fused)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, fused)]
    for step in range(5):
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        for run, opt in ((plain, opts[0]), (fast, opts[1])):
            torch.manual_seed(step)  # the same dropout masks: the fused part draws no random numbers
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, rtol=0, atol=1e-4, msg=name)


@needs_ext
def test_modern_in_eval_mode_is_the_plain_model():
    model = _modern_with_trained_looking_norms(1)
    fast = fastcpu.fast_forward(model).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    assert int(model.bn1.num_batches_tracked) == 0


def test_fallback_when_disabled_or_not_a_known_model(monkeypatch):
    assert fastcpu.fast_forward(lenet5_1998()) is None
    assert fastcpu.fast_forward(classic().double()) is None
    assert fastcpu.fast_forward(modern().double()) is None
    changed = modern()
    changed.conv2 = torch.nn.Conv2d(6, 8, kernel_size=5, bias=False)  # not the shape the kernel computes
    assert fastcpu.fast_forward(changed) is None
    monkeypatch.setenv("LENET_NO_EXT", "1")
    assert fastcpu.load_extension() is None
    assert fastcpu.fast_forward(classic()) is None
    assert fastcpu.fast_forward(modern()) is None


def test_choosing_the_path_leaves_the_global_rng_alone():
    # resume restores the RNG state and then picks the path: picking must not draw numbers
    model = modern()
    state = torch.get_rng_state()
    fastcpu.fast_forward(model)
    assert torch.equal(torch.get_rng_state(), state)
