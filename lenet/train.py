"""fit(): the plain training loop, for one process or many (torchrun), with checkpoints and resume.

Batches are sliced from in-memory uint8 tensors and normalised on the device, so an epoch does no
per-sample Python work. Every epoch adds one JSON line to metrics.jsonl and rewrites last.safetensors (and
best.safetensors when test accuracy improves), each file atomically. Only rank 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from lenet import atomic, augment, checkpoint, data, sdlm
from lenet.device import resolve_device
from lenet.errors import LenetError
from lenet.evaluate import evaluate
from lenet.models import INPUT_NORMALIZATION, build, count_parameters, map_loss

_PAPER_RECIPE = dict(
    epochs=20, batch_size=16, optimizer="sdlm", lr=5e-4, schedule="lecun1998", weight_decay=0.0
)
# The default recipe for each model: what a bare `lenet train --model NAME` uses.
RECIPES: dict[str, dict] = {
    "classic": dict(
        epochs=10, batch_size=128, optimizer="adam", lr=1e-2, schedule="one-cycle", weight_decay=0.0
    ),
    # with affine distortions: 99.40-99.44% final and >= 99.0% from epoch 4 (seeds 0-2, one thread);
    # without: 99.20-99.37% final and >= 99.0% from epoch 5
    "modern": dict(
        epochs=10,
        batch_size=128,
        optimizer="adamw",
        lr=1e-2,
        schedule="one-cycle",
        weight_decay=5e-4,
        augment="affine",
    ),
    # The 1998 paper's networks: its training (SDLM, 20 passes, the per-pass eta table from 0.0005 per
    # sample) on batches of 16 (LeNet-1: 8) instead of single samples, and the MAP loss for LeNet-5's RBF
    # output. docs/lenet5-1998.md explains each choice.
    "lenet5-1998": {**_PAPER_RECIPE, "loss": "map"},
    "lenet1": {**_PAPER_RECIPE, "batch_size": 8},
    "lenet4": _PAPER_RECIPE,
}
OPTIMIZERS = ("sgd", "adam", "adamw", "sdlm")
SCHEDULES = ("constant", "step", "cosine", "one-cycle", "lecun1998")
LOSSES = ("cross-entropy", "map")
MAP_J = 1.0  # the paper's constant j of the MAP loss (it gives no value; see docs/lenet5-1998.md)
# The paper's eta per pass, relative to the first: 0.0005 x2, 0.0002 x3, 0.0001 x3, 0.00005 x4, then 0.00001.
LECUN1998_FACTORS = (1, 1, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1)
LECUN1998_LAST = 0.02
# What fit writes into the run folder (atomically: a kill mid-write leaves a temp file, removed on restart)
RUN_FILES = (
    "config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curves.png", "confusion.png",
)  # fmt: skip


@dataclass
class TrainConfig:
    model: str = "classic"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128  # global: split evenly across processes under torchrun
    optimizer: str = "adam"
    lr: float = 3e-3  # peak learning rate of the schedule
    momentum: float = 0.9  # sgd only
    schedule: str = "one-cycle"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/classic"
    resume: bool = False
    compile: bool = False
    sync_batchnorm: bool = False
    max_steps_per_epoch: int | None = None  # smoke tests and benchmarks: cut each epoch short
    augment: str = "none"  # per-batch distortions: none, affine or elastic (lenet/augment.py)
    loss: str = "cross-entropy"  # or "map": the 1998 paper's criterion, for the RBF output of lenet5-1998

    @classmethod
    def for_model(cls, model: str, **overrides) -> TrainConfig:
        """The model's recipe, with any non-None override applied on top."""
        values = {"model": model, "out": f"runs/{model}", **RECIPES.get(model, {})}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _unknown(flag: str, value: str, allowed: tuple[str, ...]) -> LenetError:
    return LenetError(f"{flag}: unknown {value!r}, expected one of {', '.join(allowed)}")


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at a step: a pure function of the step, so resume needs no scheduler state."""
    progress = step / max(total_steps, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":  # divide by 10 at 50% and 75% of training
        return cfg.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "one-cycle":  # linear warm-up over the first 15%, then cosine down to zero
        warmup = 0.15
        if progress < warmup:
            return cfg.lr * (0.04 + 0.96 * progress / warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    if cfg.schedule == "lecun1998":  # constant within a pass, the paper's table across passes
        epoch = step * cfg.epochs // max(total_steps, 1)
        return cfg.lr * (LECUN1998_FACTORS[epoch] if epoch < len(LECUN1998_FACTORS) else LECUN1998_LAST)
    raise _unknown("--schedule", cfg.schedule, SCHEDULES)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sdlm":
        if cfg.weight_decay:
            raise LenetError("--weight-decay: the sdlm optimizer has none; use 0")
        return sdlm.SDLM(model.parameters(), lr=cfg.lr, samples_per_step=cfg.batch_size)
    raise _unknown("--optimizer", cfg.optimizer, OPTIMIZERS)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group when its environment is set; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device_name)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A dead peer must end the job with an error, not hang it: collectives time out.
    timeout = timedelta(seconds=float(os.environ.get("LENET_DIST_TIMEOUT", "120")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank), device


def _all_reduce_sum(values: list[float], device: torch.device, dist_info: Distributed) -> list[float]:
    if dist_info.world_size == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _test_metrics(model, dataset: data.Dataset, mean: float, std: float, dist_info: Distributed, device):
    """Loss, accuracy and confusion matrix over the full test set, each rank taking its own stride of it."""
    images = dataset.test_images[dist_info.rank :: dist_info.world_size]
    labels = dataset.test_labels[dist_info.rank :: dist_info.world_size]
    result = evaluate(model, images, labels, mean, std)
    loss_sum, correct, count, *confusion = _all_reduce_sum(
        [result["loss"] * len(labels), result["accuracy"] * len(labels), float(len(labels))]
        + result["confusion"].flatten().double().tolist(),
        device,
        dist_info,
    )
    classes = len(result["confusion"])
    return loss_sum / count, correct / count, torch.tensor(confusion).round().long().view(classes, classes)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    memory_format: torch.memory_format = torch.contiguous_format,
    loss_name: str = "cross-entropy",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch (B, 28, 28); returns the (detached) loss and the logits."""
    x = data.normalize(images, mean, std).contiguous(memory_format=memory_format)  # (B, 1, 28, 28)
    logits = model(x)
    loss = map_loss(logits, labels, MAP_J) if loss_name == "map" else F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def fast_cpu_module(model: torch.nn.Module) -> torch.nn.Module:
    """`classic` or `modern` with their conv blocks run by the fused CPU kernels (lenet/fastcpu.py) when
    they can be built; the same parameters, so training it trains model. Other models are returned as is."""
    from lenet import fastcpu

    return fastcpu.fast_forward(model) or model


def _rng_tensors(generator: torch.Generator, aug_generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "rng.torch": torch.get_rng_state(),
        "rng.data": generator.get_state(),
        "rng.augment": aug_generator.get_state(),
    }


def fit(cfg: TrainConfig, log=print, dataset: data.Dataset | None = None) -> dict:
    """Train cfg.model on cfg.dataset; returns the final metrics and checkpoint paths.

    log receives human-readable lines (rank 0 only). dataset, when given, is used instead of loading
    cfg.dataset (tests and benchmarks pass small in-memory sets). Raises LenetError for user-caused problems.
    """
    for flag, value, allowed in (
        ("--optimizer", cfg.optimizer, OPTIMIZERS),
        ("--schedule", cfg.schedule, SCHEDULES),
        ("--augment", cfg.augment, augment.AUGMENTS),
        ("--loss", cfg.loss, LOSSES),
    ):
        if value not in allowed:
            raise _unknown(flag, value, allowed)
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise LenetError("--epochs, --batch-size and --lr must be positive")
    dist_info, device = setup_distributed(cfg.device)
    if cfg.batch_size % dist_info.world_size:
        raise LenetError(
            f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly "
            f"among {dist_info.world_size} processes"
        )
    say = log if dist_info.is_main else (lambda *_: None)
    if cfg.sync_batchnorm and dist_info.world_size > 1 and device.type != "cuda":
        raise LenetError("--sync-batchnorm needs CUDA (PyTorch syncs batch norm only across GPUs)")
    out = Path(cfg.out)
    last_path, best_path, metrics_path = (
        out / "last.safetensors",
        out / "best.safetensors",
        out / "metrics.jsonl",
    )

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    aug_generator = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # own stream: data order unchanged
    if dataset is None:
        dataset = data.load(cfg.dataset, cfg.data_dir, log=say)
    dataset = dataset.to(device)
    spec = data.DATASETS[cfg.dataset]
    mean, std = INPUT_NORMALIZATION.get(cfg.model, (spec.mean, spec.std))
    model = build(cfg.model, **cfg.model_kwargs).to(device)
    optimizer = make_optimizer(cfg, model)

    start_epoch, best_acc = 0, -1.0
    row: dict = {}  # metrics of the latest epoch; a resumed run starts from those of its checkpoint
    if cfg.resume and last_path.exists():
        ckpt = checkpoint.load(last_path)
        if ckpt.meta["model"] != {"name": cfg.model, "kwargs": cfg.model_kwargs}:
            raise LenetError(
                f"{last_path}: holds model {ckpt.meta['model']}, not {cfg.model} {cfg.model_kwargs}"
            )
        if ckpt.meta["config"]["optimizer"] != cfg.optimizer:
            raise LenetError(
                f"{last_path}: was trained with --optimizer {ckpt.meta['config']['optimizer']}, "
                f"cannot resume with {cfg.optimizer}"
            )
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        generator.set_state(ckpt.tensors["rng.data"])
        if "rng.augment" in ckpt.tensors:
            aug_generator.set_state(ckpt.tensors["rng.augment"])
        start_epoch, best_acc = ckpt.meta["epoch"], ckpt.meta.get("best_test_acc", -1.0)
        row = ckpt.meta.get("metrics", {})
        say(f"resuming {last_path} after epoch {start_epoch}")
    elif cfg.resume:
        say(f"--resume: no checkpoint at {last_path}, starting afresh")

    metric_lines: list[str] = []  # metrics.jsonl, rewritten whole (atomically) every epoch
    if dist_info.is_main:
        atomic.make_folder(out)
        atomic.remove_leftovers(out, RUN_FILES)
        config = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
        atomic.write_bytes(out / "config.json", config.encode())
        metric_lines = _kept_metrics(metrics_path, start_epoch)
        _write_metrics(metrics_path, metric_lines)

    fused_sdlm = None  # lenet5-1998's SDLM training in one CPU kernel: whole chunks of batches per call
    if device.type == "cpu" and dist_info.world_size == 1 and not cfg.compile and cfg.loss == "map":
        from lenet import fastcpu

        fused_sdlm = fastcpu.fused_sdlm(model, optimizer, MAP_J)
    # Channels-last lets oneDNN pick faster convolution kernels on CPU (1.4x for classic on a 2-core AVX2
    # CPU), but CPU batch norm is slower in it (modern: 4.9k vs 6.4k images/s), so models with batch norm
    # keep the default layout.
    has_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    cpu_channels_last = device.type == "cpu" and not has_norm and fused_sdlm is None  # it reads rows
    memory_format = torch.channels_last if cpu_channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    train_model = eval_model = model
    if device.type == "cpu" and dist_info.world_size == 1 and not cfg.compile:
        train_model = eval_model = fast_cpu_module(model)
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.sync_batchnorm:  # swaps the norm layers in place, sharing their parameters and buffers
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    per_rank_batch = cfg.batch_size // dist_info.world_size
    steps_per_epoch = len(dataset.train_images) // cfg.batch_size  # drop_last: every step sees a full batch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    say(
        f"training {cfg.model} ({count_parameters(model):,} parameters) on {cfg.dataset}, device {device}, "
        f"{dist_info.world_size} process(es), global batch {cfg.batch_size}, {cfg.epochs} epochs"
    )

    meta_base = {
        "model": {"name": cfg.model, "kwargs": cfg.model_kwargs},
        "normalization": {"mean": mean, "std": std},
        "input_shape": [1, 28, 28],
        "dataset": cfg.dataset,
        "classes": list(spec.classes),
        "config": dataclasses.asdict(cfg),
    }
    if start_epoch >= cfg.epochs:
        say(f"{last_path} already holds {start_epoch} epochs: nothing left to train")
    confusion = None
    for epoch in range(start_epoch, cfg.epochs):
        train_model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        # the fused SDLM kernel reads chunks of whole batches (the same samples in the same order), distorted
        # together; each batch is still its own step, at the learning rate of the chunk's first step
        load_size = fused_sdlm.chunk if fused_sdlm is not None else per_rank_batch
        batches = data.batches(
            dataset.train_images,
            dataset.train_labels,
            load_size,
            shuffle=True,
            generator=generator,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            drop_last=fused_sdlm is None,
        )
        if cfg.optimizer == "sdlm":  # the paper re-estimates the Hessian diagonal before each pass
            pick = torch.randperm(len(dataset.train_images), generator=generator)[: sdlm.HESSIAN_SAMPLES]
            sample = data.normalize(dataset.train_images[pick.to(device)], mean, std)
            optimizer.set_curvature(sdlm.curvature(model, sample.contiguous(memory_format=memory_format)))
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", dist_info.is_main)
        step_in_epoch = 0
        for images, labels in batches:
            if step_in_epoch >= steps_per_epoch:
                break
            if fused_sdlm is not None:  # whole batches, and no more than the epoch's steps
                keep = min(len(labels) // per_rank_batch, steps_per_epoch - step_in_epoch) * per_rank_batch
                if keep == 0:
                    break
                images, labels = images[:keep], labels[:keep]
            lr = learning_rate(cfg, epoch * steps_per_epoch + step_in_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.augment != "none":
                images = augment.apply(cfg.augment, images, aug_generator)
            if fused_sdlm is not None:
                losses, logits = fused_sdlm.step(data.normalize(images, mean, std), labels, lr)
                loss = losses.mean()
            else:
                loss, logits = train_step(
                    train_model, optimizer, images, labels, mean, std, memory_format, cfg.loss
                )
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            done = step_in_epoch + len(labels) // per_rank_batch  # steps taken in this epoch
            taken = range(step_in_epoch, done)  # one step, or a fused chunk's
            if bar is not None and (any(s % 20 == 0 for s in taken) or done == steps_per_epoch):
                elapsed = time.perf_counter() - started
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}",
                    acc=f"{correct.item() / seen:.4f}",
                    img_s=f"{seen * dist_info.world_size / max(elapsed, 1e-9):,.0f}",
                    refresh=False,
                )
                bar.update(done - bar.n)
            if any(s % 50 == 0 for s in taken) and not math.isfinite(loss.item()):
                break  # the epoch's loss is then not finite either, and that stops training below
            step_in_epoch = done
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - started
        train_loss_sum, train_correct, train_seen = _all_reduce_sum(
            [loss_sum.item(), float(correct.item()), float(seen)], device, dist_info
        )
        train_loss = train_loss_sum / max(train_seen, 1)
        if not math.isfinite(train_loss):
            kept = f"; last good checkpoint: {last_path}" if last_path.exists() else ""
            raise LenetError(
                f"training diverged in epoch {epoch + 1}: loss is {train_loss} (try a lower --lr){kept}"
            )
        test_loss, test_acc, confusion = _test_metrics(eval_model, dataset, mean, std, dist_info, device)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 6),
            "train_acc": round(train_correct / max(train_seen, 1), 6),
            "test_loss": round(test_loss, 6),
            "test_acc": round(test_acc, 6),
            "lr": lr,
            "seconds": round(time.perf_counter() - started, 3),
            "images_per_s": round(train_seen / train_seconds, 1),
        }
        if dist_info.is_main:
            is_best = test_acc > best_acc
            best_acc = max(best_acc, test_acc)
            meta = {**meta_base, "epoch": epoch + 1, "metrics": row, "best_test_acc": best_acc}
            # last goes last: a run killed before it resumes from the previous epoch, drops this epoch's
            # metrics line and redoes the epoch, rewriting best the same way. Written first, last would
            # make a resume skip the metrics line and the best checkpoint of this epoch for good.
            metric_lines.append(json.dumps(row))
            _write_metrics(metrics_path, metric_lines)
            if is_best:
                checkpoint.save(best_path, model, meta)
            checkpoint.save(last_path, model, meta, optimizer, _rng_tensors(generator, aug_generator))
            say(
                f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} | "
                f"{row['images_per_s']:,.0f} img/s, {row['seconds']:.1f} s"
            )
    from lenet import plots

    if dist_info.is_main and plots.available():  # curves.png and confusion.png of the final model
        if confusion is None:  # resumed after the last epoch: no epoch ran here
            confusion = evaluate(eval_model, dataset.test_images, dataset.test_labels, mean, std)["confusion"]
        plots.training_plots(out, confusion, spec.classes)
    result = {
        "test_acc": row.get("test_acc"),
        "best_test_acc": best_acc,
        "last": str(last_path),
        "best": str(best_path),
        "metrics": str(metrics_path),
        "epochs": cfg.epochs,
        "rank": dist_info.rank,
    }
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result


def _kept_metrics(path: Path, epochs_kept: int) -> list[str]:
    """The metrics lines of the epochs the checkpoint holds, without lines of epochs lost to a kill."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epochs_kept:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a half-written last line (of a version that appended to the file)
    return kept


def _write_metrics(path: Path, lines: list[str]) -> None:
    atomic.write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, only when stderr is a terminal (it stays out of pipes and logs)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
