import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lenet import checkpoint, cli, data, export, models
from lenet.errors import LenetError


def folder_names(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def classic_onnx(classic_checkpoint, mnist_cache, tmp_path_factory):
    """(checkpoint, exported .onnx, report) for the classic checkpoint, exported once for this module."""
    ckpt = tmp_path_factory.mktemp("classic-export") / "classic.safetensors"
    ckpt.write_bytes(classic_checkpoint.read_bytes())
    report = export.export(ckpt, "onnx", data_dir=mnist_cache / "mnist")
    return ckpt, ckpt.with_suffix(".onnx"), report


@pytest.mark.real_data
def test_onnx_export_matches_pytorch_and_carries_its_contract(classic_onnx, mnist_cache):
    ckpt, path, report = classic_onnx
    check = report["verification"]
    assert report["path"] == str(path)
    assert folder_names(path.parent) == ["classic.onnx", "classic.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert check["images"] == 10000 and check["argmax_mismatches"] == 0
    assert check["max_abs_prob_diff"] <= check["tolerance"] == 1e-5  # the plain criterion holds here
    assert check["accuracy"] == check["torch_accuracy"] > 0.9

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    meta = checkpoint.load(ckpt).meta
    model = export.OnnxModel(path)
    assert model.classes == tuple(meta["classes"]) and model.input_shape == (1, 28, 28)
    assert model.normalization["mean"] == meta["normalization"]["mean"] == data.MNIST_MEAN
    assert model.normalization["std"] == meta["normalization"]["std"] and model.normalization["in_graph"]
    assert model.metadata["input"]["dtype"] == "uint8" and model.quantization == "none"
    assert model.source_sha256 == export.sha256_file(ckpt) == report["sha256"]

    images = data.load("mnist", mnist_cache / "mnist").test_images[:7]
    torch_model, _ = checkpoint.load_model(ckpt)
    expected = torch.softmax(torch_model(data.normalize(images, data.MNIST_MEAN, data.MNIST_STD)), 1)
    for batch_size in (1, 3, 7):  # any batch size, (N, 28, 28) or (N, 1, 28, 28)
        got = model.predict(images.numpy(), batch_size=batch_size)
        np.testing.assert_allclose(got, expected.detach().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(model.predict(images.numpy()[:, None]), model.predict(images.numpy()))
    assert model.predict(np.zeros((0, 28, 28), np.uint8)).shape == (0, 10)
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, 1, 28, 28\), got float32"):
        model.predict(np.zeros((2, 28, 28), np.float32))
    source_dir = str(Path(export.__file__).parent).encode()
    assert source_dir not in path.read_bytes()  # the exporter's stack traces name this machine's files


@pytest.mark.real_data
def test_the_onnx_runtime_path_does_not_import_torch(classic_onnx):
    _, path, _ = classic_onnx
    code = (
        "import sys, numpy as np; from lenet.export import OnnxModel; "
        f"m = OnnxModel({str(path)!r}); p = m.predict(np.zeros((2, 28, 28), np.uint8)); "
        "print(p.shape, round(float(p.sum()), 3), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(2,", "10)", "2.0", "False"]


def nudge(proto, delta):
    """Add delta to class 0's bias in the output layer of an ONNX graph, in place.

    Class 0 alone: the same change to every logit would leave the softmax as it was.
    """
    bias = next(t for t in proto.graph.initializer if t.name.endswith("fc3.bias"))
    nudged = numpy_helper.to_array(bias) + np.float32(delta) * (np.arange(10) == 0)
    bias.CopyFrom(numpy_helper.from_array(nudged.astype(np.float32), bias.name))


def tamper(path, out, delta):
    proto = onnx.load(path)
    nudge(proto, delta)
    onnx.save(proto, out)
    return out


@pytest.mark.real_data
def test_a_tampered_file_is_caught(classic_onnx, tmp_path, mnist_cache):
    ckpt, path, _ = classic_onnx
    _, _, ref = export.reference(ckpt, mnist_cache / "mnist")
    # A slight nudge keeps the answers but not the probabilities; a large one changes answers too.
    slight = tamper(path, tmp_path / "slight.onnx", 1e-3)
    with pytest.raises(LenetError, match=r"slight.onnx: .* 0 argmax mismatches, max abs probability"):
        export.check_onnx(slight, ref)
    assert ref.tolerance() == 1e-5  # PyTorch's own float32 error is far smaller: no allowance
    large = tamper(path, tmp_path / "large.onnx", 3.0)
    with pytest.raises(LenetError, match=r"10000 test images: [1-9]\d* argmax mismatches") as caught:
        export.check_onnx(large, ref)
    assert "\n" not in str(caught.value)
    assert export.check_onnx(path, ref)["argmax_mismatches"] == 0


@pytest.mark.real_data
def test_an_export_that_fails_its_check_is_not_written(classic_onnx, tmp_path, mnist_cache, monkeypatch):
    ckpt, path, _ = classic_onnx
    original = export.onnx_proto

    def broken(*args):  # the exporter gets the last layer's bias wrong
        proto = original(*args)
        nudge(proto, 3.0)
        return proto

    monkeypatch.setattr(export, "onnx_proto", broken)
    (tmp_path / "old.onnx").write_bytes(b"an earlier export")
    with pytest.raises(LenetError, match=r"old.onnx: differs .* max abs probability difference"):
        export.export(ckpt, "onnx", out=tmp_path / "old.onnx", data_dir=mnist_cache / "mnist")
    assert folder_names(tmp_path) == ["old.onnx"]  # no temp file left, the old file untouched
    assert (tmp_path / "old.onnx").read_bytes() == b"an earlier export"


@pytest.mark.real_data
def test_int8_keeps_accuracy_within_0_2_points(modern_checkpoint, tmp_path, mnist_cache):
    out = tmp_path / "modern.int8.onnx"
    report = export.export(
        modern_checkpoint, "onnx", out=out, quantize="int8", data_dir=mnist_cache / "mnist"
    )
    int8, fp32 = report["verification"], report["fp32"]
    assert fp32["argmax_mismatches"] == 0 and fp32["max_abs_prob_diff"] <= 1e-5
    assert int8["accuracy"] >= int8["torch_accuracy"] - 0.002 and int8["torch_accuracy"] > 0.98
    assert int8["images_per_s"] > 0 and fp32["images_per_s"] > 0
    proto = onnx.load(out)
    assert {"QLinearConv", "QGemm"} <= {node.op_type for node in proto.graph.node}
    assert export.OnnxModel(out).quantization == "int8-static-qoperator"
    assert report["bytes"] < 100_000  # int8 weights: about 3.5x smaller than the fp32 file


def test_int8_check_is_about_accuracy_not_argmax():
    labels = np.arange(1000) % 10
    exact = np.eye(10, dtype=np.float32)[labels]
    ref = export.Reference(
        images=np.zeros((1000, 1, 28, 28), np.uint8),
        labels=labels,
        probabilities=exact,
        accuracy=1.0,
        calibration=exact[:0],
        sha256="",
        fp32_error=0.0,
    )
    one_off = exact.copy()
    one_off[0] = np.roll(one_off[0], 1)  # one answer in 1000 changes: 0.1 points
    assert export.compare(one_off, ref, quantized=True, label="m")["argmax_mismatches"] == 1
    with pytest.raises(LenetError, match="m: differs from PyTorch on 1000 test images: 1 argmax mismatches"):
        export.compare(one_off, ref, quantized=False, label="m")
    three_off = one_off.copy()
    three_off[1:3] = np.roll(three_off[1:3], 1, axis=1)
    with pytest.raises(LenetError, match=r"int8 accuracy 0.9970 is 0.30 points below PyTorch's 1.0000"):
        export.compare(three_off, ref, quantized=True, label="m")


def test_fp32_tolerance_grows_only_with_pytorchs_own_float32_error():
    labels = np.arange(100) % 10
    exact = np.full((100, 10), 0.05, np.float32)
    exact[np.arange(100), labels] = 0.55
    measured = []

    def ref(fp32_error):
        def measure():
            measured.append(fp32_error)
            return fp32_error

        images = np.zeros((100, 1, 28, 28), np.uint8)
        return export.Reference(images, labels, exact, 1.0, images[:0], "", measure_fp32_error=measure)

    close = exact + np.float32(8e-6)
    assert export.compare(close, ref(3e-5), quantized=False, label="m")["tolerance"] == 1e-5
    assert measured == []  # within 1e-5: no float64 run
    off = exact + np.float32(5e-5)
    with pytest.raises(LenetError, match=r"0 argmax mismatches, max abs probability difference 5e-05"):
        export.compare(off, ref(1e-6), quantized=False, label="m")
    assert export.compare(off, ref(3e-5), quantized=False, label="m")["tolerance"] == 6e-5
    assert measured == [1e-6, 3e-5]


@pytest.mark.real_data
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_round_trip(classic_onnx, tmp_path, mnist_cache):
    ckpt = classic_onnx[0]
    out = tmp_path / "classic.pt"
    report = export.export(ckpt, "torchscript", out=out, data_dir=mnist_cache / "mnist")
    assert (
        report["verification"]["argmax_mismatches"] == 0 and report["verification"]["max_abs_prob_diff"] == 0
    )
    extra = {export.TORCHSCRIPT_META: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    info = json.loads(extra[export.TORCHSCRIPT_META])
    assert info["classes"] == list("0123456789") and info["source_sha256"] == export.sha256_file(ckpt)
    images = data.load("mnist", mnist_cache / "mnist").test_images[:5]
    model, _ = checkpoint.load_model(ckpt)
    with torch.no_grad():
        expected = torch.softmax(model(data.normalize(images, data.MNIST_MEAN, data.MNIST_STD)), 1)
        assert torch.equal(loaded(images[:, None]), expected)
        torch.testing.assert_close(loaded(images[:1, None]), expected[:1], rtol=0, atol=1e-6)  # any batch
    assert export.verify(out, ckpt, mnist_cache / "mnist")["images"] == 10000


@pytest.mark.real_data
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_exports_with_parity(name, tmp_path, mnist_cache):
    torch.manual_seed(0)
    ckpt = tmp_path / f"{name}.safetensors"
    meta = {
        "model": {"name": name, "kwargs": {}},
        "normalization": {"mean": data.MNIST_MEAN, "std": data.MNIST_STD},
        "input_shape": [1, 28, 28],
        "dataset": "mnist",
        "classes": list(data.DATASETS["mnist"].classes),
    }
    checkpoint.save(ckpt, models.build(name).eval(), meta)
    for fmt in export.FORMATS:
        check = export.export(ckpt, fmt, data_dir=mnist_cache / "mnist")["verification"]
        assert check["images"] == 10000 and check["argmax_mismatches"] == 0
        assert check["max_abs_prob_diff"] <= check["tolerance"] <= 1e-4
    assert folder_names(tmp_path) == [f"{name}.onnx", f"{name}.safetensors", f"{name}.torchscript.pt"]
    images = data.load("mnist", mnist_cache / "mnist").test_images[:3].numpy()
    onnx_model = export.OnnxModel(tmp_path / f"{name}.onnx")
    np.testing.assert_allclose(
        onnx_model.predict(images, batch_size=1), onnx_model.predict(images), atol=1e-6
    )


def test_without_the_onnx_extra_the_cli_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    assert cli.main(["export", str(tmp_path / "any.safetensors"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime" in err and "pip install 'lenet[onnx]'" in err
    with pytest.raises(LenetError, match=r"pip install 'lenet\[onnx\]'"):
        export.OnnxModel(tmp_path / "model.onnx")


def test_user_errors_name_the_flag_or_file(tmp_path, capsys):
    assert cli.main(["export", "x.safetensors", "--format", "torchscript", "--quantize", "int8"]) == 2
    assert "--quantize: expected int8 with --format onnx" in capsys.readouterr().err
    assert cli.main(["export", "x.safetensors", "-o", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(LenetError, match="junk.onnx: not a readable ONNX model"):
        export.OnnxModel(tmp_path / "junk.onnx")
    assert set(export.FORMATS) == {"onnx", "torchscript"}


@pytest.mark.real_data
def test_cli_export_smoke(classic_onnx, tmp_path, mnist_cache, capsys):
    ckpt = classic_onnx[0]
    out = tmp_path / "m.onnx"
    argv = ["export", str(ckpt), "-o", str(out), "--data-dir", str(mnist_cache / "mnist"), "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["verification"]["argmax_mismatches"] == 0
    assert out.read_bytes() == classic_onnx[1].read_bytes()  # exporting is deterministic
    text = export.format_report(report).splitlines()
    assert text[0].startswith(f"wrote {out} (onnx, ") and "0 argmax mismatches" in text[1]


@pytest.mark.real_data
def test_bench_export_measures_every_backend_beside_pytorch(mnist_cache, monkeypatch):
    from lenet import bench

    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    result = bench.bench_export(("classic",), calls=5, rounds=1)
    for backend in ("torch", "onnx", "int8"):
        assert result[f"classic_{backend}_latency_us"] > 0 and result[f"classic_{backend}_images_per_s"] > 0
    # the ratio of the rates it reports, to the two decimals it is rounded to (a relative tolerance failed
    # whenever ONNX Runtime ran slower than PyTorch: 0.28 for 0.2845)
    assert result["classic_onnx_throughput_speedup"] == pytest.approx(
        result["classic_onnx_images_per_s"] / result["classic_torch_images_per_s"], abs=0.0051
    )


@pytest.mark.real_data
def test_lenet_predict_runs_an_onnx_model_without_torch(classic_onnx):
    ckpt, path, _ = classic_onnx
    digits = sorted((Path(__file__).parent / "digits").iterdir())[:20]
    code = (
        "import sys; from lenet.cli import main; code = main(sys.argv[1:]); "
        "print('torch-imported' if 'torch' in sys.modules else 'torch-free', file=sys.stderr); sys.exit(code)"
    )
    run = lambda model: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, "predict", str(model), *map(str, digits), "--json", "--workers", "0"],
        capture_output=True,
        text=True,
    )
    onnx_run, torch_run = run(path), run(ckpt)
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert "torch-free" in onnx_run.stderr
    onnx_rows = [json.loads(line) for line in onnx_run.stdout.splitlines()]
    torch_rows = [json.loads(line) for line in torch_run.stdout.splitlines()]
    assert [r["digit"] for r in onnx_rows] == [r["digit"] for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"], strict=True)) < 1e-5
