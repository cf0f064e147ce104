import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lenet import imagefiles
from lenet.errors import LenetError
from lenet.evaluate import predict_logits
from lenet.imagefiles import expand_paths, predict_files
from lenet.models import build
from lenet.predict import (
    SMALL_BATCH,
    WindowMax,
    classifier,
    feature_maps,
    first_filters,
    fold_batch_norm,
    predict,
)
from lenet.preprocess import preprocess

DIGITS = Path(__file__).parent / "digits"


def lenet(*args, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "lenet", *args], input=stdin, capture_output=True, env=os.environ, timeout=600
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("modern").eval()


def test_predict_gives_probabilities_for_uint8_batches(model):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    probabilities = predict(model, images, 0.13, 0.31)
    assert probabilities.shape == (5, 10) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(1), torch.ones(5))
    expected = torch.softmax(predict_logits(model, images, 0.13, 0.31), 1)
    assert torch.allclose(probabilities, expected)
    for same in (images.numpy(), images[:, None], images.numpy()[:, None]):
        assert torch.equal(predict(model, same, 0.13, 0.31), probabilities)
    assert predict(model, images[:0], 0.13, 0.31).shape == (0, 10)


def test_predict_refuses_what_breaks_the_contract(model):
    with pytest.raises(ValueError, match="uint8"):
        predict(model, torch.rand(2, 28, 28), 0.13, 0.31)  # already normalised floats: ambiguous
    with pytest.raises(ValueError, match=r"images\[None\]"):
        predict(model, torch.zeros(28, 28, dtype=torch.uint8), 0.13, 0.31)
    with pytest.raises(ValueError, match="28, 28"):
        predict(model, torch.zeros(2, 32, 32, dtype=torch.uint8), 0.13, 0.31)


def test_small_batches_agree_with_large_ones_and_leave_torch_settings_as_found(model):
    images = torch.randint(0, 256, (4 * SMALL_BATCH, 28, 28), dtype=torch.uint8)
    together = predict(model, images, 0.13, 0.31)  # oneDNN's convolutions
    alone = torch.cat([predict(model, image[None], 0.13, 0.31) for image in images])  # PyTorch's own
    assert torch.allclose(alone, together, atol=1e-6)
    found = torch.backends.mkldnn.enabled
    try:
        for setting in (False, True):
            torch.backends.mkldnn.enabled = setting
            with ThreadPoolExecutor(4) as threads:  # overlapping small batches, as a server's threads make
                answers = list(threads.map(lambda image: predict(model, image[None], 0.13, 0.31), images))
            assert torch.backends.mkldnn.enabled is setting
            assert torch.allclose(torch.cat(answers), together, atol=1e-6)
    finally:
        torch.backends.mkldnn.enabled = found


def test_predict_leaves_a_training_model_training():
    model = build("modern").train()
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    first = predict(model, images, 0.13, 0.31)
    assert model.training and torch.equal(predict(model, images, 0.13, 0.31), first)  # eval: no dropout


@pytest.mark.parametrize("name", ["classic", "modern"])
def test_feature_maps_are_the_activations_the_pooling_layers_read(name):
    model = build(name).eval()
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    maps = feature_maps(model, image, 0.13, 0.31)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"conv1": (6, 28, 28), "conv2": (16, 10, 10)}
    x = ((image.float() / 255 - 0.13) / 0.31).view(1, 1, 28, 28)
    with torch.no_grad():
        for layer_name, layer in model.named_children():
            if layer_name == "pool1":
                assert torch.allclose(maps["conv1"], x[0], atol=1e-6)
            if layer_name == "pool2":
                assert torch.allclose(maps["conv2"], x[0], atol=1e-6)
                break
            x = layer(x)
    filters_name, filters = first_filters(model)
    assert filters_name == "conv1" and torch.equal(filters, model.conv1.weight.detach().view(6, 5, 5))


def test_folding_batch_norm_keeps_the_function_and_the_feature_maps():
    torch.manual_seed(0)
    model = build("modern").train()
    with torch.no_grad():  # running statistics and affine parameters away from their initial 0 and 1
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28) * 2 + 0.5)
        for layer in model.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_batch_norm(model)
    assert [name for name, _ in folded.named_children()] == [
        "conv1", "act1", "pool1", "conv2", "act2", "pool2", "flatten", "fc1", "act3", "fc2", "act4", "fc3",
    ]  # fmt: skip
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    assert torch.allclose(predict(folded, images, 0.13, 0.31), predict(model, images, 0.13, 0.31), atol=1e-6)
    for name, maps in feature_maps(folded, images[0], 0.13, 0.31).items():
        assert torch.allclose(maps, feature_maps(model, images[0], 0.13, 0.31)[name], atol=1e-5)
    assert fold_batch_norm(build("classic")).state_dict().keys() == build("classic").state_dict().keys()


@pytest.mark.parametrize("k, size", [(2, (28, 28)), (2, (11, 9)), (3, (10, 14))])
def test_window_max_is_max_pooling_exactly(k, size):
    pool = torch.nn.MaxPool2d(k)
    assert WindowMax.can_replace(pool) and not WindowMax.can_replace(torch.nn.MaxPool2d(k, stride=1))
    for batch in (1, 4 * SMALL_BATCH):  # max_pool2d itself, then the elementwise maxima
        x = torch.randn(batch, 3, *size)
        x[0, 0, 0, 0] = float("nan")
        assert torch.equal(WindowMax(k)(x).nan_to_num(), pool(x).nan_to_num())
        assert WindowMax(k)(x)[0, 0, 0, 0].isnan()


def test_expand_paths_takes_files_folders_globs_and_stdin(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    folder = [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    assert expand_paths([str(tmp_path)]) == folder  # sorted, images only
    assert expand_paths([str(tmp_path / "*.png"), "-", str(tmp_path / "a.jpg")]) == [
        folder[1],
        "-",
        folder[0],
    ]
    assert expand_paths([str(tmp_path / "missing.png"), str(tmp_path / "*.gif")]) == [
        str(tmp_path / "missing.png"),
        str(tmp_path / "*.gif"),
    ]  # kept, to fail one by one
    with pytest.raises(LenetError, match="empty: folder holds no images"):
        expand_paths([str(tmp_path / "empty")])


def test_predict_files_reports_failures_in_place_and_goes_on(model, tmp_path):
    good = sorted(DIGITS.glob("[37]_*.png"))[:6]
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = [str(good[0]), str(broken), *map(str, good[1:]), str(tmp_path / "missing.png")]
    rows = list(predict_files(classifier(model, 0.13, 0.31), paths, workers=0))
    assert [row["path"] for row in rows] == paths
    assert "not a readable image" in rows[1]["error"] and "no such file" in rows[-1]["error"]
    good_rows = [row for row in rows if "error" not in row]
    assert len(good_rows) == len(good)
    assert all(abs(sum(row["probabilities"]) - 1) < 1e-5 for row in good_rows)
    pooled = list(predict_files(classifier(model, 0.13, 0.31), paths, workers=2))
    assert pooled == rows  # worker processes change nothing but the speed


def test_predict_files_keeps_the_order_across_worker_jobs_and_forward_passes(model, tmp_path, monkeypatch):
    monkeypatch.setattr(imagefiles, "JOB", 3)  # files per worker job
    monkeypatch.setattr(imagefiles, "CHUNK", 3)  # here a forward pass per job
    good = [str(path) for path in sorted(DIGITS.glob("*.png"))[:9]]
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = [str(broken), *good[:5], *[str(broken)] * 3, *good[5:]]  # jobs: mixed, good, broken, good, 1 good
    classify = classifier(model, 0.13, 0.31)
    rows = list(predict_files(classify, paths, workers=0))
    assert [row["path"] for row in rows] == paths
    assert ["error" in row for row in rows] == [path == str(broken) for path in paths]
    expected = classify(np.stack([preprocess(path) for path in good]))
    assert np.allclose([row["probabilities"] for row in rows if "error" not in row], expected, atol=1e-6)
    assert list(predict_files(classify, paths, workers=2)) == rows


@pytest.mark.real_data
def test_predict_command(modern_checkpoint, tmp_path):
    files = sorted(DIGITS.iterdir())[::9]  # 29 images, every digit
    folder = tmp_path / "mine"
    folder.mkdir()
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    result = lenet("predict", str(modern_checkpoint), str(folder), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [Path(row["path"]).name for row in rows] == [p.name for p in files]
    for row in rows:
        assert row["error"] is None and len(row["probabilities"]) == 10
        assert abs(sum(row["probabilities"]) - 1) < 1e-5 and len(row["top_k"]) == 3
        assert row["digit"] == row["top_k"][0][0] == str(int(np.argmax(row["probabilities"])))
    assert sum(row["digit"] == Path(row["path"]).name[0] for row in rows) >= 26

    (folder / "zz-empty.png").write_bytes(b"")
    pngs = sorted(folder.glob("*.png"))
    stdin = files[0].read_bytes()
    result = lenet("predict", str(modern_checkpoint), str(folder / "*.png"), "-", stdin=stdin)
    assert result.returncode == 1  # one image failed, the others were still predicted
    lines = result.stdout.decode().splitlines()
    assert [line.split(": ")[0] for line in lines] == [*map(str, pngs[:-1]), "-"]
    assert lines[-1].startswith(f"-: {files[0].name[0]} ")  # "PATH: DIGIT PROBABILITY"
    errors = result.stderr.decode().splitlines()
    assert len(errors) == 1 and "zz-empty.png: not a readable image" in errors[0]


@pytest.mark.real_data
def test_explain_command_writes_one_figure(modern_checkpoint, tmp_path):
    out = tmp_path / "explain.png"
    image = sorted(DIGITS.glob("4_*drawn*"))[0]
    result = lenet("explain", str(modern_checkpoint), str(image), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"{image}: 4 ") and out.stat().st_size > 30_000
    assert Image.open(out).size[0] >= 1000
    result = lenet("explain", str(modern_checkpoint), str(tmp_path / "nothing.png"), "-o", str(out))
    assert result.returncode == 2 and result.stderr.decode().count("\n") == 1


@pytest.mark.real_data
def test_predict_benchmark_reports_every_path(mnist_cache, monkeypatch):
    """`lenet bench predict --quick`: single images, a folder both ways and a 4-digit number (its candidates
    classified in the kernel and in PyTorch's layers), each timed."""
    from lenet import bench

    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    threads = torch.get_num_threads()
    result = bench.run("predict", quick=True)  # on one torch thread, as `lenet predict` runs
    assert torch.get_num_threads() == threads  # and the caller's count put back
    timed = ("p50_ms", "p99_ms", "baseline_p50_ms", "read_4_digits_p50_ms",
             "read_4_digits_torch_layers_p50_ms", "folder_images_per_s", "read_kernel_speedup")  # fmt: skip
    assert result["images"] == 600 and all(result[key] > 0 for key in timed)
    assert result["p50_ms"] <= result["p99_ms"] and result["folder_speedup"] > 0
