import pytest
import torch

from lenet import augment, checkpoint, data, fastcpu
from lenet.errors import LenetError
from lenet.evaluate import evaluate
from lenet.train import TrainConfig, fit


def digits(n: int = 16) -> torch.Tensor:
    """(n, 28, 28) uint8: a filled 12x8 block of ink in the middle, like a centred digit."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 8:20, 10:18] = 255
    return images


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(N, 2): x and y of each image's ink centre, in pixels."""
    images = images.float()
    coords = torch.arange(28, dtype=torch.float32)
    mass = images.sum((1, 2))
    return torch.stack([(images.sum(1) * coords).sum(1) / mass, (images.sum(2) * coords).sum(1) / mass], 1)


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_distortions_keep_shape_range_and_are_repeatable(name):
    images = digits()
    first = augment.apply(name, images, torch.Generator().manual_seed(3))
    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 255
    assert torch.equal(first, augment.apply(name, images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment.apply(name, images, torch.Generator().manual_seed(4)))
    assert not torch.allclose(first, images.float(), atol=1.0)  # it did distort
    assert not torch.allclose(first[0], first[1], atol=1.0)  # each image its own distortion
    # the ink stays: distortions move, stretch and compress it (elastic ones locally), never erase it
    ratio = first.sum((1, 2)) / images.float().sum((1, 2))
    assert ratio.min() > 0.4 and ratio.max() < 1.6


def test_zero_strength_is_the_identity():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        augment.affine(images, generator, strength=0.0), images.float(), atol=1e-2, rtol=0
    )
    torch.testing.assert_close(
        augment.elastic(images, generator, alpha=0.0), images.float(), atol=1e-2, rtol=0
    )
    assert augment.apply("none", images, generator) is images


def test_translation_moves_the_ink_by_at_most_its_range(monkeypatch):
    for constant in ("SCALE", "SQUEEZE", "SHEAR"):
        monkeypatch.setattr(augment, constant, 0.0)
    images = digits(64)
    moved = augment.affine(images, torch.Generator().manual_seed(0))
    shift = centre_of_mass(moved) - centre_of_mass(images)
    assert shift.abs().max() <= augment.TRANSLATE_PX + 1e-3
    assert shift.abs().max() > augment.TRANSLATE_PX / 2  # and it does translate
    assert shift[:, 0].std() > 0.5 and shift[:, 1].std() > 0.5  # both ways, at random


@pytest.mark.real_data
def test_distorted_digits_keep_their_labels(modern_checkpoint, mnist_cache):
    """A network trained without distortions still reads distorted test digits: labels are preserved
    (it loses points on shapes it never saw: about 5 for affine, 2 to 10 for elastic)."""
    model, meta = checkpoint.load_model(modern_checkpoint)
    test = data.load("mnist", mnist_cache / "mnist")
    images, labels = test.test_images[:2000], test.test_labels[:2000]
    norm = meta["normalization"]
    plain = evaluate(model, images, labels, norm["mean"], norm["std"])["accuracy"]
    for name in ("affine", "elastic"):
        distorted = augment.apply(name, images, torch.Generator().manual_seed(0))
        accuracy = evaluate(model, distorted, labels, norm["mean"], norm["std"])["accuracy"]
        assert plain > 0.97 and accuracy > 0.85, name  # chance is 0.1; 0.88-0.95 seen across checkpoints


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_training_with_distortions_resumes_exactly(tmp_path, tiny_dataset, name):
    def config(folder, **overrides):
        return TrainConfig(
            model="classic", epochs=2, batch_size=32, lr=0.01, augment=name, device="cpu",
            out=str(tmp_path / folder), val_split=0, **overrides,
        )  # fmt: skip

    fit(config("a"), log=lambda _: None, dataset=tiny_dataset)

    class Killed(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1:"):
            raise Killed

    with pytest.raises(Killed):
        fit(config("b"), log=stop_after_first_epoch, dataset=tiny_dataset)
    fit(config("b", resume=True), log=lambda _: None, dataset=tiny_dataset)
    a, b = (checkpoint.load(tmp_path / f / "last.safetensors") for f in ("a", "b"))
    assert "rng.augment" in a.tensors
    for tensor in a.model_state:
        assert torch.equal(a.model_state[tensor], b.model_state[tensor]), tensor
    plain = TrainConfig(**{**config("c").__dict__, "augment": "none"})
    fit(plain, log=lambda _: None, dataset=tiny_dataset)
    c = checkpoint.load(tmp_path / "c" / "last.safetensors")
    assert not torch.equal(a.model_state["conv1.weight"], c.model_state["conv1.weight"])


def test_unknown_distortion_is_a_clear_error(tmp_path, tiny_dataset):
    with pytest.raises(
        LenetError, match="--augment: unknown 'rotate', expected one of none, affine, elastic"
    ):
        fit(TrainConfig(augment="rotate", out=str(tmp_path)), log=lambda _: None, dataset=tiny_dataset)


@pytest.mark.skipif(fastcpu.load_extension() is None, reason="no C++ compiler for the kernel")
@pytest.mark.parametrize("strength", [0.0, 1.0, 3.0])  # 3: corners read far outside the image
@pytest.mark.parametrize("shape", [(37, 28, 28), (5, 20, 33)])
def test_the_cpu_kernels_affine_resampling_is_grid_samples(strength, shape, monkeypatch):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as patch:  # uint8 images on CPU: the kernel resamples, not grid_sample
        patch.setattr(augment.F, "grid_sample", None)
        fused = augment.affine(images, torch.Generator().manual_seed(1), strength)
    monkeypatch.setenv("LENET_NO_EXT", "1")  # the same draws through grid_sample
    plain = augment.affine(images, torch.Generator().manual_seed(1), strength)
    assert fused.shape == plain.shape and fused.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=0, atol=0.01)  # pixel values in [0, 255]
    assert fused.min() >= 0 and fused.max() <= 255
