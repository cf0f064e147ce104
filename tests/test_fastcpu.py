"""The fused CPU kernels compute the plain model's function and gradients: `classic` and `modern`, and
lenet5-1998's SDLM training steps, at any batch size."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lenet import checkpoint, fastcpu, native, predict, sdlm
from lenet.data import normalize
from lenet.models import classic, lenet5_1998, map_loss, modern
from lenet.steps import MAP_J
from lenet.train import TrainConfig, fit

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
@pytest.mark.parametrize("batch", [1, 37, 300])
def test_modern_in_eval_mode_computes_the_plain_models_function(batch, monkeypatch):
    model = _modern_with_trained_looking_norms(batch)
    with torch.no_grad():  # running statistics away from 0 and 1, so that folding them in matters
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    fast = fastcpu.fast_forward(model)
    model.eval()  # the wrapped model's mode is what counts
    x = torch.randn(batch, 1, 28, 28) * 2
    with torch.no_grad():
        expected = model(x)
        with monkeypatch.context() as patch:  # the conv stages run in the kernel, not in the plain layers
            patch.setattr(model.conv1, "forward", None)
            torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 0  # evaluation leaves the running statistics alone
    fast(x).sum().backward()  # eval mode with autograd: the plain model, so gradients reach every weight
    assert all(p.grad is not None for p in model.parameters())


def _predictable(name: str) -> torch.nn.Module:
    """A classic, or a modern with its batch norms folded as predict.load folds them (running statistics
    away from 0 and 1, so that folding them in matters)."""
    torch.manual_seed(3)
    if name == "classic":
        return classic().eval()
    model = modern()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return predict.fold_batch_norm(model.eval())


@needs_ext
@pytest.mark.parametrize("name", ["classic", "modern"])
def test_predictions_in_the_kernel_are_the_models_and_follow_its_weights(name, monkeypatch):
    model = _predictable(name)
    assert fastcpu.inference(model) is not None
    images = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8)
    mean, std = 0.1307, 0.3081

    def plain_then_kernel(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            expected = torch.softmax(model(normalize(images[:n], mean, std)), 1)
        with monkeypatch.context() as patch:  # the conv stages run in the kernel, not in the plain layers
            patch.setattr(model.conv1, "forward", None)
            if n <= predict.NUMPY_BATCH:  # and the rest in numpy, not in PyTorch
                patch.setattr(torch.nn.functional, "linear", None)
            return predict.predict(model, images[:n], mean, std), expected

    # within one block of samples, a whole one, across blocks; finished in numpy up to NUMPY_BATCH, beyond
    for n in (2, 13, 16, 17, 40, predict.NUMPY_BATCH, predict.NUMPY_BATCH + 1, 100):
        probabilities, expected = plain_then_kernel(n)
        torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
        assert probabilities.dtype == torch.float32
    with monkeypatch.context() as patch, pytest.raises(TypeError):  # kernel=False: the plain layers run
        patch.setattr(model.conv1, "forward", None)
        predict.predict(model, images, mean, std, kernel=False)
    with torch.no_grad():  # weights changed in place, as an optimizer step changes them
        model.conv2.weight.mul_(-1.5)
        model.fc1.bias.add_(0.3)
    for n in (40, 100):
        torch.testing.assert_close(*plain_then_kernel(n), rtol=1e-5, atol=1e-6)
    model.fc2.weight = torch.nn.Parameter(torch.randn_like(model.fc2.weight))  # a parameter replaced
    for n in (40, 100):
        torch.testing.assert_close(*plain_then_kernel(n), rtol=1e-5, atol=1e-6)
    model.fc1.weight = torch.nn.Parameter(model.fc1.weight.detach().t().contiguous().t())  # not contiguous
    torch.testing.assert_close(*plain_then_kernel(40), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.fc1.weight.mul_(0.5)
    torch.testing.assert_close(*plain_then_kernel(40), rtol=1e-5, atol=1e-6)
    expected = [plain_then_kernel(n)[1] for n in (40, 100)]
    model.train()  # predictions are the eval-mode function (no dropout), and the model is left training
    for n, eval_mode in zip((40, 100), expected, strict=True):
        probabilities = predict.predict(model, images[:n], mean, std)
        torch.testing.assert_close(probabilities, eval_mode, rtol=1e-5, atol=1e-6)
    assert model.training


def test_predictions_without_the_kernel_where_it_does_not_compute_the_model(monkeypatch):
    assert fastcpu.inference(modern().eval()) is None  # batch norms not folded: fast_forward's FastModern
    assert fastcpu.inference(lenet5_1998()) is None
    model = _predictable("modern")
    if fastcpu.load_extension() is not None:
        assert fastcpu.inference(model) is not None
    model.conv2 = torch.nn.Conv2d(6, 8, kernel_size=5)  # a layer replaced: the model is looked at again
    assert fastcpu.inference(model) is None

    monkeypatch.setenv("LENET_NO_EXT", "1")
    assert fastcpu.inference(_predictable("classic")) is None


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


def _sdlm_pair(seed: int, batch: int):
    """Two identical lenet5-1998 models, each with an SDLM optimizer for batches of `batch` holding the same
    curvature."""
    torch.manual_seed(seed)
    plain, fused = lenet5_1998(), lenet5_1998()
    fused.load_state_dict(plain.state_dict())
    opts = [sdlm.SDLM(m.parameters(), lr=5e-4, samples_per_step=batch) for m in (plain, fused)]
    hessian = sdlm.curvature(plain, torch.randn(32, 1, 28, 28))
    opts[0].set_curvature(hessian)
    opts[1].set_curvature(
        {q: hessian[p] for p, q in zip(plain.parameters(), fused.parameters(), strict=True)}
    )
    return plain, fused, opts


@needs_ext
def test_lenet5_fused_sdlm_step_subtracts_the_autograd_gradient():
    torch.manual_seed(0)
    plain, fused = lenet5_1998(), lenet5_1998()
    fused.load_state_dict(plain.state_dict())
    step = fastcpu.fused_sdlm(fused, sdlm.SDLM(fused.parameters(), lr=1.0, mu=1.0), j=MAP_J)
    x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
    loss, out = step.step(x, y, lr=1.0)  # with h = 0 and mu = 1 the step is the gradient itself
    ref_out = plain(x)
    ref_loss = map_loss(ref_out, y, MAP_J)
    ref_loss.backward()
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss.detach().view(1), rtol=1e-5, atol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.detach(), (p - p.grad).detach(), rtol=0, atol=1e-5 * scale, msg=name)


@needs_ext
@pytest.mark.parametrize("batch", [1, 4])
def test_lenet5_fused_sdlm_steps_are_sdlms_steps(batch):
    plain, fused, (plain_opt, fused_opt) = _sdlm_pair(1, batch)
    step = fastcpu.fused_sdlm(fused, fused_opt, j=MAP_J)
    x, y = torch.randn(30 * batch, 1, 28, 28), torch.randint(0, 10, (30 * batch,))

    def plain_step(i: int) -> None:
        plain_opt.zero_grad()
        batch_x, batch_y = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        map_loss(plain(batch_x), batch_y, MAP_J).backward()
        plain_opt.step()

    def assert_same_weights(atol: float) -> None:
        for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=atol * p.abs().max().item(), msg=name)

    # one call runs its batches' steps one after another
    for i in range(10):
        plain_step(i)
    step.step(x[: 10 * batch], y[: 10 * batch], lr=5e-4)
    assert_same_weights(1e-5)
    # each step is SDLM's within float rounding; from random weights and inputs, steps amplify rounding
    # differences chaotically (1e-7 to 1e-3 in 40 steps at batch 1): each step starts from the plain weights
    for i in range(10, 30):
        with torch.no_grad():
            for p, q in zip(plain.parameters(), fused.parameters(), strict=True):
                q.copy_(p)
        plain_step(i)
        step.step(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch], lr=5e-4)
        assert_same_weights(1e-6)
    if batch > 1:
        with pytest.raises(ValueError, match="not whole batches"):
            step.step(x[: batch + 1], y[: batch + 1], lr=5e-4)


@needs_ext
@pytest.mark.parametrize("batch", [1, 2])
def test_fit_with_the_fused_sdlm_gives_the_plain_loops_weights(tmp_path, tiny_dataset, monkeypatch, batch):
    # chunks of 7 samples, 10 steps per pass: whole chunks per kernel call and one cut short. A small lr keeps
    # rounding differences from growing chaotically, while one step more, less or at another lr still moves
    # the weights by far more than the tolerance.
    monkeypatch.setattr(fastcpu, "FUSED_CHUNK", 7)

    def run(folder: str):
        cfg = TrainConfig(
            model="lenet5-1998", epochs=2, batch_size=batch, lr=5e-6, max_steps_per_epoch=10,
            out=str(tmp_path / folder), device="cpu",
        )  # fmt: skip
        fit(cfg, log=lambda _: None, dataset=tiny_dataset)
        return checkpoint.load(tmp_path / folder / "last.safetensors").model_state

    fused = run("fused")
    monkeypatch.setenv("LENET_NO_EXT", "1")
    plain = run("plain")
    for name, value in plain.items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-5 * value.abs().max().item(), msg=name)


def test_fused_sdlm_only_for_lenet5_and_sdlm(monkeypatch):
    model = lenet5_1998()
    assert fastcpu.fused_sdlm(model, torch.optim.SGD(model.parameters(), lr=1e-3), 1.0) is None
    other = classic()
    assert fastcpu.fused_sdlm(other, sdlm.SDLM(other.parameters(), lr=1e-3), 1.0) is None
    rows_elsewhere = lenet5_1998().to(memory_format=torch.channels_last)  # c5.weight is no longer row-major
    assert fastcpu.fused_sdlm(rows_elsewhere, sdlm.SDLM(rows_elsewhere.parameters(), lr=1e-3), 1.0) is None
    monkeypatch.setenv("LENET_NO_EXT", "1")
    assert fastcpu.fused_sdlm(model, sdlm.SDLM(model.parameters(), lr=1e-3), 1.0) is None


# Each process waits for the go file, loads the kernel and checks one forward pass against the plain model.
_LOAD_AND_CHECK = """
import os, sys, time, torch
from lenet import fastcpu
from lenet.models import modern
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
model = modern().eval()
fast = fastcpu.fast_forward(model)
assert fast is not None, "no kernel"
x = torch.randn(20, 1, 28, 28)
with torch.no_grad():
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
"""


def _compiler_that_counts(tmp_path: Path) -> tuple[dict, Path]:
    """An environment with an empty kernel cache and a CXX that logs each build; and the log's path."""
    compiler = shutil.which("g++") or shutil.which("c++")
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho build >> "{log}"\nexec "{compiler}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": str(wrapper)}
    env.pop("LENET_NO_EXT", None)
    return env, log


@needs_ext
def test_processes_starting_at_once_on_an_empty_cache_build_the_kernel_once(tmp_path):
    env, log = _compiler_that_counts(tmp_path)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOAD_AND_CHECK, str(go)], env=env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    go.touch()
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert "unavailable" not in "".join(errors)  # none fell back to the plain model
    folder = tmp_path / "cache" / "lenet" / "ext"
    assert [p.name for p in folder.glob("*.so")] == [native.library_path().name]
    assert not list(folder.glob("build-*"))  # no temp folder left behind
    assert log.read_text().splitlines() == ["build"]  # one process built, the others waited and loaded it


@needs_ext
def test_a_damaged_library_in_the_cache_is_rebuilt(tmp_path, monkeypatch):
    env, log = _compiler_that_counts(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    target = native.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF cut short")
    (target.parent / "build-leftover").mkdir()  # a build killed midway
    go = tmp_path / "go"
    go.touch()
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_CHECK, str(go)], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert log.read_text().splitlines() == ["build"]
    assert target.stat().st_size > 10_000 and not (target.parent / "build-leftover").exists()
