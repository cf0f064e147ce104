"""Ship a checkpoint as ONNX (optionally int8) or TorchScript, verified before the file is written.

The exported model is the preprocessing contract and the network in one graph: it takes raw pixels, uint8
(N, 1, H, W) in the dataset's layout and polarity (MNIST: 28x28, white ink on black, 0-255), normalises
them inside the graph ((x / 255 - mean) / std, the same ops in the same order as `data.normalize`) and
returns softmax probabilities (N, classes), float32. With the normalisation in the graph a deployment
cannot apply the wrong one. The contract is also written out in the ONNX metadata_props (keys `lenet.*`:
input, output, normalization, classes, dataset, model, source checkpoint name and sha256, quantization),
so a reader can see what the file expects without running it. The batch dimension is dynamic.

Verification: the temporary file is run (ONNX Runtime, or TorchScript reloaded) on the whole test set of
the checkpoint's dataset and compared with PyTorch: fp32 exports must give the same argmax on every image
and probabilities within 1e-5 (or twice PyTorch's own float32 error, where that is larger: see
`Reference.tolerance`). An int8 model cannot keep argmax parity (it changes a few borderline
images), so its check is accuracy: at most 0.2 points below PyTorch's. Only a file that passes is renamed
into place; a failed one is deleted and LenetError says what differed. An older file at the destination is
left as it was.

int8: ONNX Runtime static quantization (QOperator: QLinearConv, QGemm), uint8 activations calibrated
(min/max) on the first 1,000 training images, int8 per-channel weights with a 7-bit range: on CPUs without
VNNI the uint8 x int8 kernels can saturate their 16-bit sums, which cost `modern` 0.16 points with full
8-bit weights. Softmax stays float, so probabilities keep their resolution.

TorchScript (traced) is deprecated upstream (torch 2.13 warns); it stays for libtorch (C++) deployments.
Prefer ONNX.

`OnnxModel` runs an export with onnxruntime and numpy alone: importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lenet import atomic
from lenet.errors import LenetError, optional

if TYPE_CHECKING:
    import onnx
    import torch

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
ONNX_FORMAT, ONNX_VERSION = "lenet-onnx", 1
OPSET = 18  # ONNX Runtime >= 1.14 runs it
INPUT, OUTPUT = "images", "probabilities"
TORCHSCRIPT_META = "lenet.json"  # the contract inside a TorchScript archive (torch.jit.load _extra_files)
PROB_TOLERANCE = 1e-5
INT8_MAX_ACCURACY_DROP = 0.002  # 0.2 points
CALIBRATION_IMAGES = 1000
BATCH = 2000


def _import(*names: str) -> list[Any]:
    """The optional ONNX packages, or a LenetError saying which extra to install."""
    return optional(*names, purpose="ONNX support")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and quantizer's chatter (deprecations, 'torchvision is not installed')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_output(checkpoint_path: str | Path, fmt: str, quantize: str | None = None) -> Path:
    """best.safetensors -> best.onnx, best.int8.onnx or best.torchscript.pt, beside the checkpoint."""
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}[fmt]
    return Path(checkpoint_path).with_suffix(f".{quantize}{suffix}" if quantize else suffix)


# ---------------------------------------------------------------------------------------------------------
# Running an ONNX export (no torch on this path)


class OnnxModel:
    """A lenet ONNX export in ONNX Runtime: uint8 images in, probabilities out, described by its metadata.

    `classes`, `normalization` (already applied inside the graph), `input_shape` (C, H, W), `dataset`,
    `quantization` and `source_sha256` come from the file's metadata_props. threads: ONNX Runtime's
    intra-op threads (None: its default, one per physical core).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        (ort,) = _import("onnxruntime")
        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for missing, truncated and invalid files
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LenetError(f"{path}: not a readable ONNX model: {line}") from None
        try:
            self.metadata = _read_metadata(self.session.get_modelmeta().custom_metadata_map)
        except ValueError as e:
            raise LenetError(f"{path}: unreadable lenet metadata ({e})") from None
        if self.metadata.get("format") != ONNX_FORMAT:
            raise LenetError(
                f"{path}: not a lenet ONNX export (metadata lenet.format is not {ONNX_FORMAT!r})"
            )
        if self.metadata.get("version") != ONNX_VERSION:
            version = self.metadata.get("version")
            raise LenetError(f"{path}: lenet ONNX version {version!r}, this lenet reads {ONNX_VERSION}")
        try:
            self.classes = tuple(self.metadata["classes"])
            self.normalization = self.metadata["normalization"]
            self.input_shape = tuple(self.metadata["input"]["shape"][1:])
        except (KeyError, TypeError) as e:
            raise LenetError(f"{path}: incomplete lenet metadata ({type(e).__name__}: {e})") from None
        self.dataset = self.metadata.get("dataset")
        self.quantization = self.metadata.get("quantization")
        self.source_sha256 = self.metadata.get("source_sha256")

    def predict(self, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        """Probabilities (N, classes) float32 for uint8 images (N, H, W) or (N, C, H, W)."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-2:] != self.input_shape[-2:]:
            raise ValueError(
                f"expected uint8 images (N, {', '.join(map(str, self.input_shape))}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        x = np.ascontiguousarray(x.reshape(len(x), *self.input_shape))
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(
            [
                self.session.run([OUTPUT], {INPUT: x[i : i + batch_size]})[0]
                for i in range(0, len(x), batch_size)
            ]
        )


# ---------------------------------------------------------------------------------------------------------
# Building the exports


def _deployable(model: torch.nn.Module, mean: float, std: float) -> torch.nn.Module:
    """model behind the contract: raw uint8 pixels (N, C, H, W) in, probabilities (N, classes) out."""
    import torch

    from lenet.data import normalize

    class Deployable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.mean, self.std = model, mean, std

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model(normalize(images, self.mean, self.std)), dim=1)

    return Deployable().eval()


def contract(meta: dict, source: str | Path, sha256: str, quantization: str = "none") -> dict:
    """The preprocessing contract of an export of the checkpoint file `source` (its meta and sha256 given).

    Stored as metadata_props `lenet.<key>`, each value JSON.
    """
    norm = meta["normalization"]
    classes = list(meta["classes"])
    return {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["batch", *meta["input_shape"]],
            "layout": "NCHW, raw pixels 0-255 in the dataset's polarity (MNIST: white ink on black)",
        },
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(classes)], "softmax": True},
        "normalization": {
            "mean": norm["mean"],
            "std": norm["std"],
            "formula": "(pixels / 255 - mean) / std",
            "in_graph": True,
        },
        "classes": classes,
        "dataset": meta["dataset"],
        "model": meta["model"],
        "source": Path(source).name,
        "source_sha256": sha256,
        "quantization": quantization,
    }


def _read_metadata(props: dict[str, str]) -> dict:
    """The lenet.* metadata_props, each value JSON, as one dict without the prefix."""
    return {
        key.removeprefix("lenet."): json.loads(value)
        for key, value in props.items()
        if key.startswith("lenet.")
    }


def _set_metadata(proto: onnx.ModelProto, info: dict) -> None:
    kept = [p for p in proto.metadata_props if not p.key.startswith("lenet.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in info.items():
        proto.metadata_props.add(key=f"lenet.{key}", value=json.dumps(value))


def onnx_proto(model: torch.nn.Module, meta: dict, info: dict) -> onnx.ModelProto:
    """The fp32 ONNX graph of model (eval mode) behind the contract, with `info` as lenet.* metadata."""
    import torch

    onnx = _import("onnx", "onnxscript")[0]
    example = torch.zeros(2, *meta["input_shape"], dtype=torch.uint8)  # batch 2: 0 and 1 get specialised
    with _quiet():
        program = torch.onnx.export(
            _deployable(model, meta["normalization"]["mean"], meta["normalization"]["std"]),
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = program.model_proto
    # The exporter tags every node with stack traces holding this machine's file paths: drop them so the
    # file is the same wherever it is made.
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del item.metadata_props[:]
    _set_metadata(proto, info)
    onnx.checker.check_model(proto)
    return proto


def quantize_int8(fp32: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static int8 quantization (see the module docstring) calibrated on uint8 images (N, C, H, W)."""
    onnx, quantization = _import("onnx", "onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT: calibration[i : i + 200]} for i in range(0, len(calibration), 200)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    info = _read_metadata({p.key: p.value for p in fp32.metadata_props})
    softmax = [node.name for node in fp32.graph.node if node.op_type == "Softmax"]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32.SerializeToString())  # a ModelProto argument would be changed in place
        quantization.quantize_static(
            source,
            out,
            Reader(),
            quant_format=quantization.QuantFormat.QOperator,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            nodes_to_exclude=softmax,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        proto = onnx.load(out)
    _set_metadata(proto, {**info, "quantization": "int8-static-qoperator"})
    onnx.checker.check_model(proto)
    return proto


def torchscript_bytes(model: torch.nn.Module, meta: dict, info: dict) -> bytes:
    """A TorchScript archive of model behind the contract, with `info` as JSON in lenet.json.

    Traced, not scripted: tracing takes any model that runs (torch.jit.script rejects module-level Python
    constants, for one). A trace could bake in the example's batch size; the check runs other batch sizes.
    """
    import torch

    example = torch.zeros(2, *meta["input_shape"], dtype=torch.uint8)
    deployable = _deployable(model, meta["normalization"]["mean"], meta["normalization"]["std"])
    buffer = io.BytesIO()
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(deployable, (example,), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_META: json.dumps(info)})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Verification


@dataclass
class Reference:
    """PyTorch's answer on a test set: what every export is compared with."""

    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, classes) float32
    accuracy: float
    calibration: np.ndarray  # (CALIBRATION_IMAGES, C, H, W) uint8, from the training set
    sha256: str  # of the checkpoint
    # max abs difference of PyTorch's float32 probabilities from a float64 run; measured when first needed
    fp32_error: float | None = None
    measure_fp32_error: Callable[[], float] | None = None

    def tolerance(self) -> float:
        """The largest probability difference an fp32 export may show.

        PROB_TOLERANCE (1e-5), unless PyTorch's own float32 rounding moves its probabilities further than
        half that from exact (a float64 run from the same normalised input): two float32 computations in
        different orders, each that close to exact, can differ by twice that much. Trained classic and
        modern stay far below; untrained lenet5-1998 (RBF outputs near -200) does not. The float64 run
        costs a few seconds, so it is made only for an export that differs by more than 1e-5.
        """
        if self.fp32_error is None:
            self.fp32_error = self.measure_fp32_error() if self.measure_fp32_error else 0.0
        return max(PROB_TOLERANCE, 2 * self.fp32_error)


def reference(checkpoint_path: str | Path, data_dir: str | Path | None = None) -> tuple[Any, dict, Reference]:
    """(model, meta, Reference) of a checkpoint on its dataset's whole test set, on the CPU."""
    import copy

    import torch

    from lenet import checkpoint, data
    from lenet.predict import predict

    model, meta = checkpoint.load_model(checkpoint_path, "cpu")
    dataset = data.load(meta["dataset"], data_dir)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    probabilities = predict(model, dataset.test_images, mean, std, kernel=False)

    @torch.no_grad()
    def measure_fp32_error() -> float:
        model64, images = copy.deepcopy(model).double(), dataset.test_images
        exact = torch.cat(
            [
                torch.softmax(model64(data.normalize(images[i : i + BATCH], mean, std).double()), 1)
                for i in range(0, len(images), BATCH)
            ]
        )
        return float((probabilities.double() - exact).abs().max()) if len(images) else 0.0

    shape = tuple(meta["input_shape"])
    ref = Reference(
        images=dataset.test_images.numpy().reshape(-1, *shape),
        labels=dataset.test_labels.numpy(),
        probabilities=probabilities.numpy(),
        accuracy=float((probabilities.argmax(1) == dataset.test_labels).double().mean()),
        calibration=dataset.train_images[:CALIBRATION_IMAGES].numpy().reshape(-1, *shape),
        sha256=sha256_file(checkpoint_path),
        measure_fp32_error=measure_fp32_error,
    )
    return model, meta, ref


def compare(probabilities: np.ndarray, ref: Reference, quantized: bool, label: str) -> dict:
    """Check an export's probabilities against PyTorch's; LenetError naming label and what differed."""
    mismatches = int((probabilities.argmax(1) != ref.probabilities.argmax(1)).sum())
    max_diff = float(np.abs(probabilities - ref.probabilities).max()) if len(ref.labels) else 0.0
    accuracy = float((probabilities.argmax(1) == ref.labels).mean())
    result = {
        "images": len(ref.labels),
        "argmax_mismatches": mismatches,
        "max_abs_prob_diff": max_diff,
        "accuracy": accuracy,
        "torch_accuracy": ref.accuracy,
    }
    n = len(ref.labels)
    if quantized:
        result["max_accuracy_drop"] = INT8_MAX_ACCURACY_DROP
        if ref.accuracy - accuracy > INT8_MAX_ACCURACY_DROP:
            raise LenetError(
                f"{label}: int8 accuracy {accuracy:.4f} is {100 * (ref.accuracy - accuracy):.2f} points "
                f"below PyTorch's {ref.accuracy:.4f} on {n} test images "
                f"(at most {100 * INT8_MAX_ACCURACY_DROP:.1f} allowed)"
            )
        return result
    # the float64 run behind ref.tolerance() is needed only where 1e-5 is not met and argmax is
    result["tolerance"] = PROB_TOLERANCE if mismatches or max_diff <= PROB_TOLERANCE else ref.tolerance()
    if mismatches or not max_diff <= result["tolerance"]:
        raise LenetError(
            f"{label}: differs from PyTorch on {n} test images: {mismatches} argmax mismatches, "
            f"max abs probability difference {max_diff:.3g} (allowed: 0 and {result['tolerance']:.3g})"
        )
    return result


def _timed(run: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


def check_onnx(path: str | Path, ref: Reference, label: str | None = None) -> dict:
    """Run an ONNX export over ref's images in ONNX Runtime and compare (see `compare`).

    Errors name `label` (default: path), so a check of a temporary file can name the file it will become.
    """
    label = label or str(path)
    (onnx,) = _import("onnx")
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError, DecodeError, OSError... for a bad file
        raise LenetError(
            f"{label}: onnx.checker rejects the model: {str(e).strip().splitlines()[0]}"
        ) from None
    model = OnnxModel(path)
    if model.source_sha256 != ref.sha256:
        raise LenetError(f"{label}: made from another checkpoint (source sha256 {model.source_sha256})")
    probabilities, seconds = _timed(lambda: model.predict(ref.images))
    result = compare(probabilities, ref, model.quantization != "none", label)
    return {**result, "images_per_s": round(len(ref.labels) / seconds, 1)}


def check_torchscript(path: str | Path, ref: Reference, label: str | None = None) -> dict:
    """Reload a TorchScript export, run it over ref's images and compare (see `compare`, `check_onnx`)."""
    import torch

    label = label or str(path)
    extra = {TORCHSCRIPT_META: ""}
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
        info = json.loads(extra[TORCHSCRIPT_META] or "null")
    except (RuntimeError, ValueError) as e:
        raise LenetError(
            f"{label}: not a readable TorchScript export: {str(e).strip().splitlines()[0]}"
        ) from None
    if not isinstance(info, dict) or info.get("source_sha256") != ref.sha256:
        raise LenetError(
            f"{label}: not a TorchScript export of this checkpoint ({TORCHSCRIPT_META} disagrees)"
        )
    images = torch.from_numpy(ref.images)

    def run() -> np.ndarray:
        with torch.no_grad():
            return torch.cat([module(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]).numpy()

    probabilities, seconds = _timed(run)
    result = compare(probabilities, ref, False, label)
    return {**result, "images_per_s": round(len(ref.labels) / seconds, 1)}


def verify(path: str | Path, checkpoint_path: str | Path, data_dir: str | Path | None = None) -> dict:
    """Check an existing export (ONNX or TorchScript, told apart by content) against its checkpoint."""
    _, _, ref = reference(checkpoint_path, data_dir)
    return (check_torchscript if zipfile.is_zipfile(path) else check_onnx)(path, ref)


def _write_verified(path: Path, data: bytes, check: Callable[[Path], dict]) -> dict:
    """Write data to a temp file beside path, check that file, then rename it into place; else delete it."""
    return atomic.write(path, lambda f: f.write(data), check)


# ---------------------------------------------------------------------------------------------------------
# The command


def export(
    checkpoint_path: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    quantize: str | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """Export a checkpoint, verify the file on the whole test set, and only then write it at `out`.

    Returns {format, path, bytes, quantization, checkpoint, sha256, verification: {...}} and, for int8,
    fp32: the verification of the fp32 graph it was quantized from (accuracy and speed beside int8).
    """
    if fmt not in FORMATS:
        raise LenetError(f"--format: unknown format {fmt!r}, expected one of {', '.join(FORMATS)}")
    if quantize is not None and (quantize not in QUANTIZATIONS or fmt != "onnx"):
        raise LenetError(
            f"--quantize: expected {' or '.join(QUANTIZATIONS)} with --format onnx, got {quantize!r}"
        )
    if fmt == "onnx":
        _import("onnx", "onnxruntime", "onnxscript")  # before any work, so a missing extra is said at once
    path = Path(out) if out is not None else default_output(checkpoint_path, fmt, quantize)
    if not path.parent.is_dir():
        raise LenetError(f"{path}: the folder {path.parent} does not exist")
    model, meta, ref = reference(checkpoint_path, data_dir)
    info = contract(meta, checkpoint_path, ref.sha256)
    report: dict[str, Any] = {"format": fmt, "path": str(path), "quantization": quantize or "none"}
    if fmt == "torchscript":
        data = torchscript_bytes(model, meta, info)
        report["verification"] = _write_verified(
            path, data, lambda tmp: check_torchscript(tmp, ref, str(path))
        )
    else:
        proto = onnx_proto(model, meta, info)
        if quantize:
            with tempfile.TemporaryDirectory() as tmp:
                fp32_path = Path(tmp) / "fp32.onnx"
                fp32_path.write_bytes(proto.SerializeToString())
                report["fp32"] = check_onnx(fp32_path, ref, f"{path} (its fp32 graph)")
            proto = quantize_int8(proto, ref.calibration)
        data = proto.SerializeToString()
        report["verification"] = _write_verified(path, data, lambda tmp: check_onnx(tmp, ref, str(path)))
    return {**report, "bytes": len(data), "checkpoint": str(checkpoint_path), "sha256": ref.sha256}


def format_report(report: dict) -> str:
    """One line per checked model: what was written and how it compared with PyTorch."""

    def line(name: str, v: dict) -> str:
        return (
            f"{name}: accuracy {v['accuracy']:.4f} (PyTorch {v['torch_accuracy']:.4f}), "
            f"{v['argmax_mismatches']} argmax mismatches, max |dp| {v['max_abs_prob_diff']:.2g} "
            f"on {v['images']} test images, {v['images_per_s']:,.0f} images/s"
        )

    lines = [f"wrote {report['path']} ({report['format']}, {report['bytes']:,} bytes, verified)"]
    if "fp32" in report:
        lines.append(line("fp32", report["fp32"]))
    name = report["quantization"] if report["quantization"] != "none" else report["format"]
    lines.append(line(name, report["verification"]))
    return "\n".join(lines)
