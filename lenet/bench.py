"""Speed benchmarks. Each one measures a baseline in the same process, so the ratio is what counts.

`train`: the tutorial's loop (a per-sample Dataset that makes a PIL image, resizes it and converts it to
a float tensor, as torchvision's Resize + ToTensor do; a DataLoader with batch 256 and shuffle; Adam)
against ours (batches sliced from in-memory uint8 tensors, normalised per batch, the fused CPU kernels),
both training `classic` at batch 256 on real MNIST; `classic` and `modern` trained and evaluated as fit
does; the fraction of torch.mm's FLOP rate and of the CPU's peak multiply-add rate that training reaches,
measured in the same run (docs/speed.md explains each number).

`export`: single-image latency and batch throughput of ONNX Runtime (fp32 and int8) against PyTorch, for
`classic` and `modern`, on the same number of threads.

`predict`: one user image in process (PNG bytes -> preprocess -> predict, p50 and p99) against the
tutorials' decode-resize-forward, a folder of 10,000 PNGs through `lenet predict`'s path against the
same work one file at a time, and a 4-digit number read in process (`lenet read`'s path, p50 and p99).

`serve`: requests per second and latency of `lenet serve` (one process, then one per CPU) under 32
concurrent clients (another process) POSTing real MNIST test PNGs, against GET /healthz on one process.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from lenet.errors import LenetError

BATCH = 256


class TutorialDataset(torch.utils.data.Dataset):
    """The tutorials' per-sample path: uint8 array -> PIL image -> resize -> float tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index], mode="L").resize((28, 28), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        return pixels.view(1, 28, 28).float().div(255), int(self.labels[index])


def _tutorial_images_per_s(dataset, steps: int) -> float:
    import torch.nn.functional as F

    from lenet.models import classic

    torch.manual_seed(0)
    model = classic()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        TutorialDataset(dataset.train_images.numpy(), dataset.train_labels.numpy()),
        batch_size=BATCH,
        shuffle=True,
    )
    seen, started = 0, 0.0
    for step, (x, y) in enumerate(loader):
        if step == 2:  # the first batches pay one-off start-up costs
            started, seen = time.perf_counter(), 0
        if step == steps + 2:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - started)


def _ours_images_per_s(dataset, steps: int, name: str = "classic", batch: int = BATCH, recipe: bool = False):
    """Our loop: batches sliced from the in-memory uint8 tensors, through train_step and the fused kernels.

    recipe: the model's default recipe as fit runs it (optimizer, peak learning rate, distortions);
    otherwise Adam at lr 1e-3 without distortions, as the tutorial loop trains.
    """
    from lenet import augment, data
    from lenet.config import TrainConfig
    from lenet.fastcpu import fast_forward
    from lenet.models import build
    from lenet.steps import train_step
    from lenet.train import make_optimizer

    torch.manual_seed(0)
    model = build(name)
    cfg = TrainConfig(model=name, batch_size=batch, device="cpu")
    optimizer = make_optimizer(cfg, model) if recipe else torch.optim.Adam(model.parameters(), lr=1e-3)
    distortion = cfg.augment if recipe else "none"
    model = fast_forward(model) or model
    generator = torch.Generator().manual_seed(0)
    mean, std = data.MNIST_MEAN, data.MNIST_STD
    batches = data.batches(
        dataset.train_images, dataset.train_labels, batch, shuffle=True, generator=generator, drop_last=True
    )
    seen, started = 0, 0.0
    for step, (images, labels) in enumerate(batches):
        if step == 2:  # the first steps pay one-off start-up costs
            started, seen = time.perf_counter(), 0
        if step == steps + 2:
            break
        images = augment.apply(distortion, images, generator)
        train_step(model, optimizer, images, labels, mean, std)
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def _eval_images_per_s(dataset, repeats: int, name: str) -> float:
    """Test-set images/s of the model as fit evaluates it: eval mode, through the fused kernels."""
    from lenet import data
    from lenet.evaluate import predict_logits
    from lenet.fastcpu import fast_forward
    from lenet.models import build

    plain = build(name)
    model = (fast_forward(plain) or plain).eval()
    predict_logits(model, dataset.test_images[:2000], data.MNIST_MEAN, data.MNIST_STD)
    started = time.perf_counter()
    for _ in range(repeats):
        predict_logits(model, dataset.test_images, data.MNIST_MEAN, data.MNIST_STD)
    return repeats * len(dataset.test_images) / (time.perf_counter() - started)


def _forward_macs(name: str) -> int:
    """Multiply-adds of one image's forward pass through the model's convolutions and linear layers."""
    from lenet.models import build, layer_table

    model = build(name)
    macs = 0
    for layer_name, shape, _ in layer_table(model):
        layer = getattr(model, layer_name)
        if isinstance(layer, torch.nn.Conv2d):
            macs += math.prod(shape) * layer.weight[0].numel()  # output elements x weights each one reads
        elif isinstance(layer, torch.nn.Linear):
            macs += layer.in_features * layer.out_features
    return macs


def _matmul_gflop_s(size: int = 2048, repeats: int = 4) -> float:
    """fp32 GFLOP/s of torch.mm on two size x size matrices at the current thread count, best of repeats."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def _sdlm_images_per_s(dataset, batch: int, samples: int, fused: bool) -> float:
    """lenet5-1998 trained by SDLM with the MAP loss as fit trains it: the fused kernel, or the plain model
    and optimizer (what runs without a compiler)."""
    from lenet import data, fastcpu, sdlm
    from lenet.config import RECIPES
    from lenet.models import INPUT_NORMALIZATION, build
    from lenet.steps import MAP_J, train_step

    lr = RECIPES["lenet5-1998"]["lr"]  # the first passes' eta
    torch.manual_seed(0)
    model = build("lenet5-1998")
    optimizer = sdlm.SDLM(model.parameters(), lr=lr, samples_per_step=batch)
    mean, std = INPUT_NORMALIZATION["lenet5-1998"]
    optimizer.set_curvature(sdlm.curvature(model, data.normalize(dataset.train_images[:500], mean, std)))
    images, labels = dataset.train_images[:samples], dataset.train_labels[:samples]
    fused_step = fastcpu.fused_sdlm(model, optimizer, MAP_J) if fused else None
    size = fused_step.chunk if fused_step is not None else batch
    started = time.perf_counter()
    for i in range(0, samples - size + 1, size):
        if fused_step is not None:
            fused_step.step(data.normalize(images[i : i + size], mean, std), labels[i : i + size], lr)
        else:
            train_step(
                model, optimizer, images[i : i + size], labels[i : i + size], mean, std, loss_name="map"
            )
    return (samples - samples % size) / (time.perf_counter() - started)


def bench_train(steps: int = 60, rounds: int = 2) -> dict:
    """Images/s of the tutorial loop and of ours on `classic` at batch 256 (best of alternating rounds);
    `classic` and `modern` as fit trains them (their recipes) and evaluates them; the FLOP rate training
    reaches against torch.mm's and the fused kernels' peak multiply-add rate, measured in the same run;
    lenet5-1998's fused SDLM kernel against the plain loop."""
    from lenet import data, fastcpu
    from lenet.config import RECIPES

    dataset = data.load("mnist")
    baseline, ours = [], []
    recipe: dict[str, list[float]] = {"classic": [], "modern": []}
    matmul = [_matmul_gflop_s()]
    for _ in range(rounds):  # alternate, so a noisy moment hurts both sides alike
        baseline.append(_tutorial_images_per_s(dataset, steps))
        ours.append(_ours_images_per_s(dataset, steps))
        for name, rates in recipe.items():
            rates.append(_ours_images_per_s(dataset, steps, name, RECIPES[name]["batch_size"], recipe=True))
    matmul.append(_matmul_gflop_s())
    result = {
        "suite": "train",
        "model": "classic",
        "batch_size": BATCH,
        "threads": torch.get_num_threads(),
        "baseline_images_per_s": round(max(baseline), 1),
        "images_per_s": round(max(ours), 1),
    }
    result["speedup"] = round(result["images_per_s"] / result["baseline_images_per_s"], 2)
    repeats = max(1, steps // 20)
    result["eval_images_per_s"] = round(_eval_images_per_s(dataset, repeats, "classic"), 1)
    for name, rates in recipe.items():
        result[f"{name}_recipe_batch_size"] = RECIPES[name]["batch_size"]
        result[f"{name}_recipe_images_per_s"] = round(max(rates), 1)
    result["modern_eval_images_per_s"] = round(_eval_images_per_s(dataset, repeats, "modern"), 1)
    # training FLOPs per image: forward and backward, about 3 forward passes of 2 FLOPs per multiply-add
    peaks = {"matmul": max(matmul)}
    if fastcpu.load_extension() is not None:
        peaks["fma"] = fastcpu.fma_gflop_s()
    for name, value in peaks.items():
        result[f"{name}_gflop_s"] = round(value, 1)
    result["train_mflop_per_image"] = round(6 * _forward_macs("classic") / 1e6, 3)
    for label, rate, name in [("train", max(ours), "classic")] + [
        (f"{name}_recipe", max(rates), name) for name, rates in recipe.items()
    ]:
        gflop_s = rate * 6 * _forward_macs(name) / 1e9
        result[f"{label}_gflop_s"] = round(gflop_s, 1)
        for peak, value in peaks.items():
            result[f"{label}_{peak}_fraction"] = round(gflop_s / value, 3)
    # lenet5-1998's SDLM training at the paper's batch of 1 and at its recipe's: fused kernel vs plain
    if fastcpu.load_extension() is not None:
        for batch in (1, RECIPES["lenet5-1998"]["batch_size"]):
            samples = steps * (20 if batch == 1 else 96)  # whole chunks of the fused kernel
            plain = _sdlm_images_per_s(dataset, batch, samples, fused=False)
            fused = _sdlm_images_per_s(dataset, batch, samples, fused=True)
            result[f"lenet5_sdlm_batch{batch}_baseline_images_per_s"] = round(plain, 1)
            result[f"lenet5_sdlm_batch{batch}_images_per_s"] = round(fused, 1)
            result[f"lenet5_sdlm_batch{batch}_speedup"] = round(fused / plain, 2)
    return result


def _cuda_steps_per_s(dataset, name: str, steps: int, tutorial: bool) -> float:
    """Images/s on the GPU: the tutorial's loop (eager Adam at batch 256, the batch a DataLoader of the
    in-memory data hands over) or fit's step for the model's GPU recipe (CudaGraphStep), timed with the
    device synchronised at both ends; distortions off in both."""
    from lenet import data
    from lenet import steps as steps_module
    from lenet.config import TrainConfig
    from lenet.models import build
    from lenet.train import make_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(name).to(device).train()
    cfg = TrainConfig(model=name, device="cuda", augment="none")
    if tutorial:
        cfg = TrainConfig(model=name, device="cuda", augment="none", batch_size=BATCH, lr=1e-3)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        mean, std, layout = data.MNIST_MEAN, data.MNIST_STD, torch.contiguous_format
        step = steps_module.PlainStep(model, optimizer, mean, std, BATCH, "cross-entropy", layout)
    else:
        step, _ = steps_module.make_step(cfg, model, make_optimizer(cfg, model), data.MNIST_MEAN,
                                         data.MNIST_STD, device, 1)  # fmt: skip
    images, labels = dataset.train_images.to(device), dataset.train_labels.to(device)
    batches = data.batches(images, labels, cfg.batch_size, shuffle=True, generator=torch.Generator(),
                           drop_last=True)  # fmt: skip
    batch_list = [b for _, b in zip(range(steps + 10), batches, strict=False)]
    for x, y in batch_list[:10]:  # warm-up, and for the graph step its capture
        step(x, y, cfg.lr, 1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for x, y in batch_list[10:]:
        step(x, y, cfg.lr, 1)
    torch.cuda.synchronize()
    return (len(batch_list) - 10) * cfg.batch_size / (time.perf_counter() - started)


def bench_train_cuda(steps: int = 200) -> dict:
    """On one CUDA GPU: the tutorial's eager loop against fit's captured step, for classic and modern, and
    evaluation of the 10,000 test images."""
    from lenet import data
    from lenet.evaluate import predict_logits
    from lenet.models import build

    if not torch.cuda.is_available():
        raise LenetError("--device cuda: CUDA is not available on this machine")
    dataset = data.load("mnist")
    result: dict = {"suite": "train", "device": torch.cuda.get_device_name()}
    for name in ("classic", "modern"):
        result[f"{name}_baseline_images_per_s"] = round(_cuda_steps_per_s(dataset, name, steps, True))
        result[f"{name}_images_per_s"] = round(_cuda_steps_per_s(dataset, name, steps, False))
        result[f"{name}_speedup"] = round(
            result[f"{name}_images_per_s"] / result[f"{name}_baseline_images_per_s"], 2
        )
        model, test = build(name).cuda().eval(), dataset.test_images.cuda()
        predict_logits(model, test, data.MNIST_MEAN, data.MNIST_STD, batch_size=len(test))
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            predict_logits(model, test, data.MNIST_MEAN, data.MNIST_STD, batch_size=len(test))
        torch.cuda.synchronize()
        result[f"{name}_eval_images_per_s"] = round(10 * len(test) / (time.perf_counter() - started))
    return result


def _latency_us(fn, calls: int) -> float:
    """Median microseconds of one call, after a few warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e6


def _throughput(fn, images: int) -> float:
    started = time.perf_counter()
    fn()
    return images / (time.perf_counter() - started)


def bench_export(models: tuple[str, ...] = ("classic", "modern"), calls: int = 300, rounds: int = 3) -> dict:
    """Single-image latency and throughput of PyTorch, ONNX Runtime fp32 and int8 on the same thread count.

    Each path is what a user calls: PyTorch is predict.predict, ONNX Runtime is
    export.OnnxModel.predict (normalisation inside the graph); throughput is over the 10,000 test images in
    batches of 2000. The models are freshly initialised (seed 0): speed does not depend on the weights.
    Best of alternating rounds, so a noisy moment hurts every backend alike.
    """
    import tempfile

    from lenet import data, export
    from lenet.models import build
    from lenet.predict import predict

    dataset = data.load("mnist")
    images, pixels = dataset.test_images, dataset.test_images.numpy()  # (10000, 28, 28) uint8
    calibration = dataset.train_images[: export.CALIBRATION_IMAGES].numpy()[:, None]
    mean, std = data.MNIST_MEAN, data.MNIST_STD
    threads = torch.get_num_threads()
    result: dict = {"suite": "export", "threads": threads, "images": len(images), "batch_size": export.BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            torch.manual_seed(0)
            model = build(name).eval()
            meta = {
                "model": {"name": name, "kwargs": {}},
                "normalization": {"mean": mean, "std": std},
                "input_shape": [1, 28, 28],
                "dataset": "mnist",
                "classes": list(dataset.classes),
            }
            fp32 = export.onnx_proto(model, meta, export.contract(meta, "untrained", ""))
            backends = {"torch": lambda x, m=model: predict(m, x, mean, std)}
            for backend, proto in (("onnx", fp32), ("int8", export.quantize_int8(fp32, calibration))):
                path = Path(tmp) / f"{name}.{backend}.onnx"
                path.write_bytes(proto.SerializeToString())
                backends[backend] = export.OnnxModel(path, threads=threads).predict
            inputs = {"torch": images, "onnx": pixels, "int8": pixels}
            latency: dict[str, list[float]] = {b: [] for b in backends}
            throughput: dict[str, list[float]] = {b: [] for b in backends}
            with torch.no_grad():
                for _ in range(rounds):
                    for backend, forward in backends.items():
                        x = inputs[backend]
                        latency[backend].append(_latency_us(lambda f=forward, x=x: f(x[:1]), calls))
                        throughput[backend].append(_throughput(lambda f=forward, x=x: f(x), len(x)))
            for backend in backends:
                result[f"{name}_{backend}_latency_us"] = round(min(latency[backend]), 1)
                result[f"{name}_{backend}_images_per_s"] = round(max(throughput[backend]), 1)
            for backend in ("onnx", "int8"):
                result[f"{name}_{backend}_latency_speedup"] = round(
                    min(latency["torch"]) / min(latency[backend]), 2
                )
                result[f"{name}_{backend}_throughput_speedup"] = round(
                    max(throughput[backend]) / max(throughput["torch"]), 2
                )
    return result


def bench_predict(
    images: int = 10_000, calls: int = 2000, baseline_images: int = 2000, rounds: int = 2
) -> dict:
    """`lenet predict`'s path against the naive one, on real MNIST test digits saved as PNG files.

    Latency (p50, p99): one PNG's bytes -> preprocess -> predict, in this process, after warm-up, beside the
    tutorials' path (decode, resize the whole image to 28x28, scale, forward). Folder: predict_files on
    `images` PNG files (decoding and preprocessing in worker processes, their start included; forward passes
    of imagefiles.CHUNK images), beside preprocess + predict one file at a time (timed on `baseline_images`);
    the best of `rounds` alternating rounds. Reading: PNG bytes of 4 test digits side by side (a scan of a
    written number) -> read.read_number, timed in the same alternation as the single images, beside the
    same reading with the candidates classified by PyTorch's layers instead of the fused kernel. `modern` with
    fresh weights (speed does not depend on them); ours folds its batch norms, as predict.load does, the
    tutorials' path runs it as built. One torch thread for all, as `lenet predict` and `lenet serve` run.
    """
    import io

    from PIL import Image

    from lenet import data
    from lenet.device import torch_threads
    from lenet.models import build
    from lenet.predict import classifier, fold_batch_norm, predict
    from lenet.preprocess import preprocess

    dataset = data.load("mnist")
    torch.manual_seed(0)
    built = build("modern").eval()
    model = fold_batch_norm(built)
    mean, std = data.MNIST_MEAN, data.MNIST_STD
    blobs = [_png(pixels) for pixels in dataset.test_images[:images].numpy()]

    def ours(source) -> None:
        predict(model, preprocess(source)[None], mean, std)

    @torch.no_grad()
    def naive(blob: bytes) -> None:
        image = Image.open(io.BytesIO(blob)).convert("L").resize((28, 28), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).sub_(mean).div_(std)
        torch.softmax(built(x.view(1, 1, 28, 28)), 1)

    calls_by_name = {
        "naive": (naive, blobs),
        "ours": (ours, blobs),
        **_reading_calls(model, mean, std, _number_pngs(dataset.test_images.numpy(), 200)),
    }
    with torch_threads(1):
        latency = _latencies(calls_by_name, calls)
        best = _folder_rates(blobs, ours, lambda: classifier(model, mean, std), baseline_images, rounds)
    return _predict_report(latency, best, len(blobs))


def _predict_report(latency: dict[str, list[float]], best: dict[str, float], images: int) -> dict:
    """bench_predict's result from the latencies of its calls (seconds, by name) and its best folder rates."""

    def ms(name: str, q: float) -> float:
        return round(float(np.percentile(latency[name], q)) * 1e3, 3)

    return {
        "suite": "predict",
        "model": "modern",
        "threads": 1,
        "cpus": os.cpu_count(),
        "images": images,
        "p50_ms": ms("ours", 50),
        "p99_ms": ms("ours", 99),
        "baseline_p50_ms": ms("naive", 50),
        "baseline_p99_ms": ms("naive", 99),
        "read_4_digits_p50_ms": ms("read", 50),
        "read_4_digits_p99_ms": ms("read", 99),
        "read_4_digits_torch_layers_p50_ms": ms("read_layers", 50),
        "read_kernel_speedup": round(ms("read_layers", 50) / ms("read", 50), 2),
        "folder_images_per_s": round(best["pool"], 1),
        "folder_in_process_images_per_s": round(best["in_process"], 1),
        "baseline_folder_images_per_s": round(best["baseline"], 1),
        "folder_speedup": round(best["pool"] / best["baseline"], 2),
    }


def _reading_calls(model: torch.nn.Module, mean: float, std: float, numbers: list[bytes]) -> dict:
    """The numbers read with the candidates classified as `lenet read` classifies them ("read": the fused
    kernel, where it computes the model) and by PyTorch's layers ("read_layers"), for _latencies."""
    from lenet.predict import classifier, predict
    from lenet.read import read_number

    classify = classifier(model, mean, std)

    def layers(images: np.ndarray) -> np.ndarray:
        return predict(model, images, mean, std, kernel=False).numpy()

    return {
        "read": (lambda b: read_number(b, classify), numbers),
        "read_layers": (lambda b: read_number(b, layers), numbers),
    }


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _latencies(calls_by_name: dict[str, tuple[Callable, list]], calls: int) -> dict[str, list[float]]:
    """Seconds per call of each name's function on its inputs in turn: `calls` timed calls each, after 20
    untimed, in two alternating halves so that a noisy moment hurts each alike."""
    import itertools

    latency: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for _ in range(2):
        for name, (call, inputs) in calls_by_name.items():
            for source in inputs[:20]:
                call(source)
            for source in itertools.islice(itertools.cycle(inputs), calls // 2):
                started = time.perf_counter()
                call(source)
                latency[name].append(time.perf_counter() - started)
    return latency


def _folder_rates(
    blobs: list[bytes], one_file: Callable, new_classifier: Callable, baseline_images: int, rounds: int
) -> dict[str, float]:
    """Images/s over a folder of the PNGs: one file at a time (`one_file`, timed on `baseline_images`),
    predict_files in process and with its worker pool; the best of `rounds` alternating rounds."""
    import tempfile

    from lenet.imagefiles import predict_files

    with tempfile.TemporaryDirectory() as folder:
        paths = [str(Path(folder) / f"{i:05d}.png") for i in range(len(blobs))]
        for path, blob in zip(paths, blobs, strict=True):
            Path(path).write_bytes(blob)
        rates: dict[str, list[float]] = {"baseline": [], "in_process": [], "pool": []}
        for _ in range(rounds):
            started = time.perf_counter()
            for path in paths[:baseline_images]:
                one_file(path)
            rates["baseline"].append(min(baseline_images, len(paths)) / (time.perf_counter() - started))
            for name, workers in (("in_process", 0), ("pool", None)):
                started = time.perf_counter()
                rows = list(predict_files(new_classifier(), paths, workers=workers))
                done = sum("error" not in row for row in rows)
                rates[name].append(done / (time.perf_counter() - started))
    return {name: max(values) for name, values in rates.items()}


def _number_pngs(images: np.ndarray, count: int, digits: int = 4) -> list[bytes]:
    """`count` PNG scans of `digits` MNIST digits (N, 28, 28) written side by side, dark on white, each
    digit's columns of ink kept and 6 pixels between digits: numbers as a person writes them."""
    pngs = []
    for k in range(count):
        written = []
        for digit in images[k * digits : (k + 1) * digits]:
            columns = np.flatnonzero(digit.max(0) > 25)
            written += [digit[:, columns[0] : columns[-1] + 1], np.zeros((28, 6), np.uint8)]
        pngs.append(_png(255 - np.pad(np.concatenate(written[:-1], axis=1), 8)))
    return pngs


async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a kept-alive connection; (status, body) of the answer."""
    import asyncio

    writer.write(request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")  # one call for the status line and headers
    except asyncio.IncompleteReadError as e:
        raise ConnectionError("connection closed") from e
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head.split(None, 2)[1]), await reader.readexactly(length)


def _requests(method: str, path: str, bodies: list[bytes], kinds: list[str]) -> list[bytes]:
    """Each body as a whole HTTP/1.1 request to 127.0.0.1 (method, path), with its Content-Type."""
    requests = []
    for body, kind in zip(bodies, kinds, strict=True):
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
        requests.append(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return requests


async def _load(
    port: int,
    method: str,
    path: str,
    bodies: list[bytes],
    total: int | None,
    clients: int,
    time_limit: float,
    kinds: list[str] | None = None,
    right: Callable[[int, int, bytes], bool] | None = None,
) -> dict:
    """`clients` connections sending `total` requests between them (bodies in turn), for <= time_limit s.

    total None: until time_limit. kinds: each body's Content-Type (default image/png). right(i, status,
    answer): whether that answers bodies[i] rightly (default: status 200 and a JSON body). Errors: wrong
    answers, failed exchanges (the client reconnects) and requests never sent. Requests start until
    time_limit; one sent before it may take up to time_limit more.
    """
    import asyncio

    latencies: list[float] = []
    failures = {"errors": 0}
    sent = 0
    deadline = time.perf_counter() + time_limit
    right = right or (lambda index, status, answer: status == 200 and answer.startswith(b"{"))
    requests = _requests(method, path, bodies, kinds or ["image/png"] * len(bodies))

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        while (total is None or sent < total) and time.perf_counter() < deadline:
            index, sent = sent % len(requests), sent + 1
            started = time.perf_counter()
            try:
                exchange = _exchange(reader, writer, requests[index])
                status, answer = await asyncio.wait_for(exchange, time_limit)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                failures["errors"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - started)
            failures["errors"] += not right(index, status, answer)
        writer.close()

    # Connected 2 ms apart, as clients arrive, not in one burst: a server process that wakes to a burst
    # accepts all of it, and with several processes one would then serve most of the connections.
    connections = []
    for _ in range(clients):
        connections.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.002)
    started = time.perf_counter()
    await asyncio.gather(*(client(reader, writer) for reader, writer in connections))
    seconds = time.perf_counter() - started
    unsent = total - sent if total is not None else 0
    return {"latencies": latencies, "errors": failures["errors"] + unsent, "seconds": seconds}


def _load_client(argv: list[str]) -> None:
    """The load process: PORT METHOD PATH BODIES_FILE TOTAL CLIENTS TIME_LIMIT -> one JSON line on stdout.

    BODIES_FILE holds the request bodies, each as a 4-byte little-endian length and the bytes. A warm-up of
    2 requests per client runs first and is not counted.
    """
    import json
    import struct

    port, method, path, bodies_file, total, clients, time_limit = argv
    blob, bodies, offset = Path(bodies_file).read_bytes(), [], 0
    while offset < len(blob):
        (length,) = struct.unpack_from("<I", blob, offset)
        bodies.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
    bodies = bodies or [b""]
    clients_n = int(clients)
    gc.collect()
    gc.freeze()  # the collector's rescans of what imports left would show as latency (see serve._worker_app)
    try:  # uvloop (lenet[serve] brings it): the load's own CPU comes out of the server's on a small machine
        from uvloop import run
    except ImportError:
        from asyncio import run
    run(_load(int(port), method, path, bodies, 2 * clients_n, clients_n, float(time_limit)))
    result = run(_load(int(port), method, path, bodies, int(total), clients_n, float(time_limit)))
    latencies = np.array(result["latencies"]) * 1e3
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "errors": result["errors"],
                "requests_per_s": round(len(latencies) / result["seconds"], 1),
                "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
            }
        )
    )


@contextlib.contextmanager
def served_modern(workers: int = 1) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """`python -m lenet serve --workers N` of a `modern` checkpoint with fresh weights (speed and safety do
    not depend on them) on a free port of 127.0.0.1: (port, server process, its log file) once it answers
    /healthz; stopped on exit. One torch thread per process, as `lenet serve` runs."""
    import tempfile
    import urllib.request

    from lenet import checkpoint, data
    from lenet.models import build

    with tempfile.TemporaryDirectory() as folder:
        ckpt, log = Path(folder) / "modern.safetensors", Path(folder) / "server.log"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build("modern").eval()
        meta = {
            "model": {"name": "modern", "kwargs": {}},
            "normalization": {"mean": data.MNIST_MEAN, "std": data.MNIST_STD},
            "input_shape": [1, 28, 28],
            "dataset": "mnist",
            "classes": list(data.DATASETS["mnist"].classes),
        }
        checkpoint.save(ckpt, model, meta)
        with socket.socket() as probe:  # a free port; the server binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "lenet",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        with log.open("wb") as out:  # a file: a full pipe would stall the server
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            server = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not start: {log.read_text()}") from None
                    time.sleep(0.1)
            yield port, server, log
        finally:
            server.terminate()
            server.wait(timeout=30)


def bench_serve(requests: int = 10_000, clients: int = 32, time_limit: float = 120.0) -> dict:
    """`lenet serve` under load: real MNIST test digits as PNG, POSTed by `clients` concurrent connections.

    The server (`served_modern`) and the load (an asyncio HTTP/1.1 client, keep-alive) run in processes of
    their own, over 127.0.0.1: first `lenet serve` as it starts by default (one process), then with
    `--workers` one per CPU (the headline numbers; one_worker_* are the first). Baseline, same run, same
    client: GET /healthz on one process, the cost of HTTP in this server alone. Each phase stops after
    `requests` requests or `time_limit` seconds; unanswered requests count as errors.
    """
    import struct
    import tempfile

    from lenet import data
    from lenet.errors import optional

    # the server runs in processes of its own: without the extra, say so here in one line
    optional("fastapi", "uvicorn", "orjson", "python_multipart", purpose="lenet bench serve")
    dataset = data.load("mnist")
    bodies = [
        _png(pixels) for pixels in dataset.test_images[: min(requests, len(dataset.test_images))].numpy()
    ]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limits = (requests, clients, time_limit)
    with tempfile.TemporaryDirectory() as folder:
        bodies_file, empty_file = Path(folder) / "bodies.bin", Path(folder) / "empty.bin"
        bodies_file.write_bytes(b"".join(struct.pack("<I", len(b)) + b for b in bodies))
        empty_file.write_bytes(b"")
        with served_modern(workers=1) as (port, _, _):
            baseline = _run_load(port, "GET", "/healthz", empty_file, *limits)
            one_worker = _run_load(port, "POST", "/api/predict", bodies_file, *limits)
        ours = one_worker
        if cpus > 1:
            with served_modern(workers=cpus) as (port, _, _):
                ours = _run_load(port, "POST", "/api/predict", bodies_file, *limits)
    facts = ("requests_per_s", "p50_ms", "p99_ms", "errors")
    return {
        "suite": "serve",
        "model": "modern",
        "clients": clients,
        "cpus": cpus,
        "workers": cpus,
        **ours,
        **{f"one_worker_{fact}": one_worker[fact] for fact in facts},
        "baseline": "GET /healthz, one worker, same client",
        **{f"baseline_{fact}": baseline[fact] for fact in facts},
        "one_worker_share_of_healthz_rate": round(
            one_worker["requests_per_s"] / baseline["requests_per_s"], 3
        ),
    }


def _run_load(
    port: int, method: str, path: str, bodies_path: Path, requests: int, clients: int, time_limit: float
) -> dict:
    """_load_client in a process of its own (so the load does not share the server's interpreter)."""
    import json

    argv = [str(port), method, path, str(bodies_path), *map(str, (requests, clients, time_limit))]
    code = "import sys; from lenet.bench import _load_client; _load_client(sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=2 * time_limit + 60,
    )
    return json.loads(out.stdout)


def run(suite: str, quick: bool = False, device: str = "cpu") -> dict:
    if suite == "train" and device == "cuda":
        return bench_train_cuda(steps=20) if quick else bench_train_cuda()
    if device != "cpu":
        raise LenetError(f"--device {device}: only `lenet bench train` runs on a GPU")
    if suite == "train":
        return bench_train(steps=5, rounds=1) if quick else bench_train()
    if suite == "export":
        return bench_export(("classic",), calls=30, rounds=1) if quick else bench_export()
    if suite == "predict":
        return bench_predict(images=600, calls=100, baseline_images=200) if quick else bench_predict()
    if suite == "serve":
        return bench_serve(requests=300, clients=8, time_limit=30) if quick else bench_serve()
    raise ValueError(f"unknown benchmark suite {suite!r}")


def format_result(result: dict) -> str:
    return "\n".join(f"{key:>32}: {value}" for key, value in result.items())
