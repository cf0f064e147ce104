"""fit(): the plain training loop, for one process or many (torchrun), with checkpoints and resume.

Batches are sliced from in-memory uint8 tensors and normalised on the device, so an epoch does no
per-sample Python work. The last `val_split` training images are held out: the epoch whose model does best
on them is kept as best.safetensors (never chosen on the test set). Every epoch adds one JSON line to
metrics.jsonl and rewrites last.safetensors (and best.safetensors when validation accuracy improves),
each file atomically. Only rank 0 prints and writes. How a step is taken (plain, fused CPU kernels, DDP,
compiled) is behind lenet/steps.py's one interface.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from lenet import atomic, augment, checkpoint, data, runfolder, sdlm
from lenet.config import RECIPES, TrainConfig
from lenet.device import resolve_device
from lenet.errors import LenetError
from lenet.evaluate import evaluate
from lenet.models import INPUT_NORMALIZATION, build, count_parameters
from lenet.progress import READ_EVERY, Progress, Watch
from lenet.steps import describe_step, make_step

__all__ = ["RECIPES", "Run", "TrainConfig", "fit", "learning_rate", "make_optimizer"]

# The paper's eta per pass, relative to the first: 0.0005 x2, 0.0002 x3, 0.0001 x3, 0.00005 x4, then 0.00001.
LECUN1998_FACTORS = (1, 1, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1)
LECUN1998_LAST = 0.02


@dataclass
class Run:
    """What fit returns: the trained module (holding the chosen epoch's weights), one metrics dict per epoch
    (metrics.jsonl's keys), and the chosen checkpoint (best.safetensors: best on the validation split, or
    the last epoch without one)."""

    model: nn.Module
    history: list[dict]
    checkpoint: Path | None  # None: no epoch finished
    folder: Path
    config: TrainConfig
    interrupted: bool = False  # stopped by Ctrl-C (KeyboardInterrupt) before its last epoch
    chosen_epoch: int | None = None  # None: no epoch finished
    rank: int = 0  # this process's rank under torchrun
    last: Path = field(init=False)

    def __post_init__(self) -> None:
        self.last = self.folder / "last.safetensors"

    def __repr__(self) -> str:
        stopped = ", interrupted" if self.interrupted else ""
        return (
            f"Run({self.config.model}, {len(self.history)} epochs in {self.folder}, chosen epoch "
            f"{self.chosen_epoch}, test accuracy {self.test_acc}{stopped})"
        )

    @property
    def test_acc(self) -> float | None:
        """Test accuracy of the chosen epoch's model."""
        rows = [r for r in self.history if r["epoch"] == self.chosen_epoch]
        return rows[0]["test_acc"] if rows else None


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
    # lecun1998: constant within a pass, the paper's table across passes
    epoch = step * cfg.epochs // max(total_steps, 1)
    return cfg.lr * (LECUN1998_FACTORS[epoch] if epoch < len(LECUN1998_FACTORS) else LECUN1998_LAST)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # one fused kernel updates every parameter, instead of several tensor operations per parameter (and on
    # CUDA it can be captured in a graph)
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    if cfg.weight_decay:
        raise LenetError("--weight-decay: the sdlm optimizer has none; use 0")
    return sdlm.SDLM(model.parameters(), lr=cfg.lr, samples_per_step=cfg.batch_size)


# ---------------------------------------------------------------------------------------------------------
# Processes


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


def _share(value, dist_info: Distributed):
    """Rank 0's value of a small picklable object, on every rank."""
    if dist_info.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------
# The pieces of a run


def _check_model(model: nn.Module, classes: int, device: torch.device) -> None:
    """One LenetError, before any training, for a model that does not map (N, 1, 28, 28) to (N, classes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 1, 28, 28, device=device))
    except Exception as e:  # whatever the user's forward raises, said in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LenetError(f"model: fails on inputs of shape (N, 1, 28, 28): {first}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, classes):
        found = f"(N, {', '.join(map(str, shape[1:]))})" if isinstance(shape, tuple) else shape
        raise LenetError(f"model: expected outputs (N, {classes}) for inputs (N, 1, 28, 28), got {found}")


def _split(dataset: data.Dataset, val_split: int) -> tuple[data.Dataset, tuple | None]:
    """The training set without its last val_split images, and those images and labels (None if 0)."""
    n = len(dataset.train_labels)
    if not 0 <= val_split < n:
        raise LenetError(
            f"--val-split: expected 0 to {n - 1} (the training set has {n:,} images), got {val_split}"
        )
    if val_split == 0:
        return dataset, None
    val = (dataset.train_images[n - val_split :], dataset.train_labels[n - val_split :])
    kept = dataclasses.replace(
        dataset,
        train_images=dataset.train_images[: n - val_split],
        train_labels=dataset.train_labels[: n - val_split],
    )
    return kept, val


def _metrics(model, images, labels, mean, std, dist_info: Distributed, device):
    """Loss, accuracy and confusion matrix over a labelled set, each rank taking its own stride of it."""
    images, labels = (
        images[dist_info.rank :: dist_info.world_size],
        labels[dist_info.rank :: dist_info.world_size],
    )
    result = evaluate(model, images, labels, mean, std)
    loss_sum, correct, count, *confusion = _all_reduce_sum(
        [result["loss"] * len(labels), result["accuracy"] * len(labels), float(len(labels))]
        + result["confusion"].flatten().double().tolist(),
        device,
        dist_info,
    )
    classes = len(result["confusion"])
    return loss_sum / count, correct / count, torch.tensor(confusion).round().long().view(classes, classes)


@dataclass
class _Rng:
    """The run's random streams: weights, dropout (torch's global), data order, distortions."""

    data: torch.Generator
    augment: torch.Generator

    @classmethod
    def seeded(cls, seed: int) -> _Rng:
        torch.manual_seed(seed)
        # distortions get their own stream, so turning them on does not change the data order
        return cls(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1_000_003))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "rng.torch": torch.get_rng_state(),
            "rng.data": self.data.get_state(),
            "rng.augment": self.augment.get_state(),
        }

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(tensors["rng.torch"])
        self.data.set_state(tensors["rng.data"])
        if "rng.augment" in tensors:
            self.augment.set_state(tensors["rng.augment"])


def _resume(cfg: TrainConfig, path: Path, model, optimizer, rng: _Rng, spec: dict, say) -> tuple[int, dict]:
    """Load the run's last checkpoint into model, optimizer and RNG; (epochs done, its meta)."""
    if not path.exists():
        say(f"--resume: no checkpoint at {path}, starting afresh")
        return 0, {}
    ckpt = checkpoint.load(path)
    if ckpt.meta["model"]["name"] != spec["name"] or ckpt.meta["model"].get("kwargs") != spec["kwargs"]:
        raise LenetError(f"{path}: holds model {ckpt.meta['model']}, not {spec['name']} {spec['kwargs']}")
    if ckpt.meta["config"]["optimizer"] != cfg.optimizer:
        raise LenetError(
            f"{path}: was trained with --optimizer {ckpt.meta['config']['optimizer']}, "
            f"cannot resume with {cfg.optimizer}"
        )
    model.load_state_dict(ckpt.model_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    rng.restore(ckpt.tensors)
    say(f"resuming {path} after epoch {ckpt.meta['epoch']}")
    return ckpt.meta["epoch"], ckpt.meta


def _sdlm_curvature(
    optimizer, model, images: torch.Tensor, generator, mean: float, std: float, memory_format
):
    """The paper re-estimates the Hessian diagonal before each pass, on a random sample of training images."""
    pick = torch.randperm(len(images), generator=generator)[: sdlm.HESSIAN_SAMPLES]
    sample = data.normalize(images[pick.to(images.device)], mean, std)
    optimizer.set_curvature(sdlm.curvature(model, sample.contiguous(memory_format=memory_format)))


def _train_epoch(step, train: data.Dataset, schedule: Callable[[int], float], first: int, steps: int,
                 cfg: TrainConfig, rng: _Rng, bar: Progress, dist_info: Distributed) -> dict:  # fmt: skip
    """One pass: `steps` steps from global step `first`; returns sums of loss, correct and samples seen."""
    device = train.train_images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, done, lr, watch = 0, 0, schedule(first), Watch(device)
    batches = data.batches(
        train.train_images, train.train_labels, step.load_size, shuffle=True, generator=rng.data,
        rank=dist_info.rank, world_size=dist_info.world_size, drop_last=step.drop_last,
    )  # fmt: skip
    for images, labels in batches:
        if done >= steps:
            break
        lr = schedule(first + done)
        if cfg.augment != "none":
            images = augment.apply(cfg.augment, images, rng.augment)
        batch_loss, batch_correct, used, taken = step(images, labels, lr, steps - done)
        if taken == 0:
            break
        loss_sum += batch_loss
        correct += batch_correct
        seen += used
        done += taken
        if done == steps or any(s % READ_EVERY == 0 for s in range(done - taken, done)):
            watch.poll(loss_sum, correct, seen)
            bar.update(done, watch)
            if watch.loss_sum is not None and not math.isfinite(watch.loss_sum):
                break  # the epoch's loss is not finite either, and that stops training in fit
    return {"loss_sum": loss_sum.item(), "correct": float(correct.item()), "seen": float(seen), "lr": lr}


def _epoch_row(epoch: int, sums: dict, started: float, train_seconds: float, val, test) -> dict:
    """The metrics line of an epoch (metrics.jsonl; the same keys everywhere)."""
    seen = max(sums["seen"], 1)
    return {
        "epoch": epoch,
        "train_loss": round(sums["loss_sum"] / seen, 6),
        "train_acc": round(sums["correct"] / seen, 6),
        "val_loss": round(val[0], 6) if val else None,
        "val_acc": round(val[1], 6) if val else None,
        "test_loss": round(test[0], 6),
        "test_acc": round(test[1], 6),
        "lr": sums["lr"],
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_s": round(sums["seen"] / train_seconds, 1),
    }


def _silent(*_args) -> None:
    pass


def _builtin(model: nn.Module) -> tuple[str, dict] | None:
    """(name, kwargs) of a module that lenet.build made and nobody changed since (same layers), else None."""
    spec = getattr(model, "lenet_spec", None)
    if spec is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building the reference must not shift the caller's RNG
        reference = build(spec["name"], **spec["kwargs"])
    return (spec["name"], spec["kwargs"]) if repr(reference) == repr(model) else None


def _config(model: str | nn.Module | TrainConfig, options: dict) -> tuple[TrainConfig, nn.Module | None]:
    """fit's first argument and options -> the run's config, and the user's module if one was given."""
    if isinstance(model, TrainConfig):
        return (dataclasses.replace(model, **options) if options else model), None
    if isinstance(model, nn.Module):
        name, kwargs = _builtin(model) or (checkpoint.class_path(type(model)), {})
        return TrainConfig(**{"model": name, "model_kwargs": kwargs, **options}), model
    return TrainConfig(model=model, **options), None


def fit(
    model: str | nn.Module | TrainConfig = "classic",
    *,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict], bool | None] | None = None,
    **options,
) -> Run:
    """Train a model on real data with checkpoints; returns a Run (model, history, checkpoint).

    model: a model name ("classic", "modern", ...), any nn.Module of your own mapping (N, 1, 28, 28) to
    (N, 10) (trained in place, with classic's recipe unless options say otherwise), or a TrainConfig.
    options: TrainConfig's fields, the same as `lenet train`'s flags (epochs=3, lr=1e-3, out="runs/x").
    log receives human-readable lines (rank 0 only); on_epoch(row) is called after every epoch with its
    metrics dict, and returning False stops the run there. Ctrl-C (KeyboardInterrupt) ends the run after the
    last finished epoch, which stays saved, and returns what it has. dataset, when given, is used instead of
    loading cfg.dataset (tests and benchmarks pass small in-memory sets). Raises LenetError for
    user-caused problems, before training where it can.
    """
    cfg, module = _config(model, options)
    dist_info, device = setup_distributed(cfg.device)
    say = log if dist_info.is_main else _silent
    run = _fit(cfg, module, dataset, device, dist_info, say, on_epoch)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return run


@dataclass
class _Context:
    """What every epoch of one run needs."""

    cfg: TrainConfig
    net: nn.Module
    step: object
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    train: data.Dataset  # training images without the validation split; test images as loaded
    val: tuple | None
    mean: float
    std: float
    rng: _Rng
    folder: runfolder.RunFolder
    meta: dict
    dist_info: Distributed
    device: torch.device
    say: Callable[[str], None]
    history: list[dict] = field(default_factory=list)
    metric_lines: list[str] = field(default_factory=list)
    best_val: float = -1.0
    chosen: int | None = None
    confusion: torch.Tensor | None = None
    start: int = 0  # epochs done before this process started (resume)


def _fit(cfg, module, dataset, device, dist_info: Distributed, say, on_epoch) -> Run:
    if cfg.batch_size % dist_info.world_size:
        raise LenetError(
            f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly "
            f"among {dist_info.world_size} processes"
        )
    if cfg.sync_batchnorm and dist_info.world_size > 1 and device.type != "cuda":
        raise LenetError("--sync-batchnorm needs CUDA (PyTorch syncs batch norm only across GPUs)")
    rng = _Rng.seeded(cfg.seed)
    net = (
        module
        if module is not None
        else checkpoint.build_model({"name": cfg.model, "kwargs": cfg.model_kwargs})
    )
    classes = len(data.DATASETS[cfg.dataset].classes)
    _check_model(
        net.to(device), classes, device
    )  # before the folder and the data: a wrong model says so at once
    optimizer = make_optimizer(cfg, net)
    folder = _claim(cfg, dist_info, say)
    try:
        ctx = _prepare(dataclasses.replace(cfg, out=str(folder.path)), module, net, optimizer, rng, folder,
                       dataset, device, dist_info, say)  # fmt: skip
        # what exists now (torch, the data, the model) lives until training ends: full garbage collections
        # need not scan it again and again, which otherwise costs a share of every epoch (docs/speed.md)
        gc.freeze()
        interrupted = _run_epochs(ctx, on_epoch)
        _finish(ctx)
    finally:
        gc.unfreeze()
        folder.release()
    chosen = folder.best if ctx.chosen is not None else None
    if chosen is not None and dist_info.is_main:  # the returned module holds the chosen epoch's weights
        net.load_state_dict(checkpoint.load(chosen).model_state)
    return Run(net, ctx.history, chosen, folder.path, ctx.cfg, interrupted, ctx.chosen, dist_info.rank)


def _prepare(
    cfg: TrainConfig, module, net, optimizer, rng, folder, dataset, device, dist_info, say
) -> _Context:
    """Data, resume, the step, the checkpoint's description of the run, config.json and metrics.jsonl."""
    spec = data.DATASETS[cfg.dataset]
    full = (dataset if dataset is not None else data.load(cfg.dataset, cfg.data_dir, log=say)).to(device)
    train, val = _split(full, cfg.val_split)
    mean, std = INPUT_NORMALIZATION.get(cfg.model, (spec.mean, spec.std))
    # a module of the user's own: its constructor arguments are found, unless given as model_kwargs
    kwargs = cfg.model_kwargs or (None if module is not None and ":" in cfg.model else {})
    model_spec = checkpoint.model_spec(net, cfg.model, kwargs)
    start, resumed = (
        _resume(cfg, folder.last, net, optimizer, rng, model_spec, say) if cfg.resume else (0, {})
    )
    step, eval_model = make_step(cfg, net, optimizer, mean, std, device, dist_info.world_size)
    meta = {
        "model": model_spec,
        "normalization": {"mean": mean, "std": std},
        "input_shape": [1, 28, 28],
        "dataset": cfg.dataset,
        "classes": list(full.classes),
        "config": dataclasses.asdict(cfg),
    }
    ctx = _Context(cfg, net, step, eval_model, optimizer, train, val, mean, std, rng, folder, meta, dist_info,
                   device, say, start=start)  # fmt: skip
    ctx.best_val, ctx.chosen = resumed.get("best_val_acc", -1.0), resumed.get("chosen_epoch")
    if dist_info.is_main:
        atomic.write_bytes(folder.config, (json.dumps(meta["config"], indent=2) + "\n").encode())
        ctx.metric_lines = runfolder.kept_metrics(folder.metrics, start)
        runfolder.write_metrics(folder.metrics, ctx.metric_lines)
    ctx.history = [json.loads(line) for line in ctx.metric_lines]
    say(
        f"training {cfg.model} ({count_parameters(net):,} parameters) on {cfg.dataset}, device {device}, "
        f"{dist_info.world_size} process(es), global batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"{len(train.train_labels):,} training images, {cfg.val_split:,} held out for validation; "
        f"run folder {folder.path}"
    )
    say(f"steps: {describe_step(step, device, dist_info.world_size, cfg)}")
    return ctx


def _claim(cfg: TrainConfig, dist_info: Distributed, say) -> runfolder.RunFolder:
    """Rank 0 claims and locks the run folder; every rank learns its path."""
    default = Path("runs") / cfg.model.split(":")[-1]  # runs/classic, or runs/LeNet for a class of your own
    folder = runfolder.claim(cfg.out, default, cfg.resume, cfg.overwrite, say) if dist_info.is_main else None
    path = _share(str(folder.path) if folder else None, dist_info)
    return folder if folder is not None else runfolder.RunFolder(Path(path), None)


def _run_epochs(ctx: _Context, on_epoch) -> bool:
    """Train the remaining epochs; True when Ctrl-C stopped them (in one process)."""
    cfg = ctx.cfg
    if ctx.start >= cfg.epochs:
        ctx.say(f"{ctx.folder.last} already holds {ctx.start} epochs: nothing left to train")
    for epoch in range(ctx.start, cfg.epochs):
        try:
            row = _one_epoch(ctx, epoch)
        except KeyboardInterrupt:
            if ctx.dist_info.world_size > 1:
                raise  # the other processes cannot be told to stop at the same point
            kept = f"; {ctx.folder.last} holds epoch {epoch}" if epoch else ""
            ctx.say(f"interrupted in epoch {epoch + 1}{kept} (--resume continues)")
            return True
        if on_epoch is not None and on_epoch(dict(row)) is False:
            ctx.say(f"stopped after epoch {epoch + 1} (on_epoch returned False)")
            break
    return False


def _one_epoch(ctx: _Context, epoch: int) -> dict:
    """Train one epoch, measure it on the validation and test sets, save it; returns its metrics row."""
    cfg, dist_info = ctx.cfg, ctx.dist_info
    started = time.perf_counter()
    steps_per_epoch = len(ctx.train.train_images) // cfg.batch_size  # every step sees a full batch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    ctx.step.module.train()
    if cfg.optimizer == "sdlm":
        images = ctx.train.train_images
        _sdlm_curvature(
            ctx.optimizer, ctx.net, images, ctx.rng.data, ctx.mean, ctx.std, ctx.step.memory_format
        )
    bar = Progress(
        steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", dist_info.is_main, dist_info.world_size
    )
    try:
        schedule = lambda s: learning_rate(cfg, s, total)  # noqa: E731
        first = epoch * steps_per_epoch
        sums = _train_epoch(
            ctx.step, ctx.train, schedule, first, steps_per_epoch, cfg, ctx.rng, bar, dist_info
        )
    finally:
        bar.close()
    train_seconds = time.perf_counter() - started
    keys = ("loss_sum", "correct", "seen")
    sums.update(zip(keys, _all_reduce_sum([sums[k] for k in keys], ctx.device, dist_info), strict=True))
    if not math.isfinite(sums["loss_sum"]):
        kept = f"; last good checkpoint: {ctx.folder.last}" if ctx.folder.last.exists() else ""
        loss = sums["loss_sum"] / max(sums["seen"], 1)
        raise LenetError(f"training diverged in epoch {epoch + 1}: loss is {loss} (try a lower --lr){kept}")
    measure = lambda images, labels: _metrics(  # noqa: E731
        ctx.eval_model, images, labels, ctx.mean, ctx.std, dist_info, ctx.device
    )
    val = measure(*ctx.val) if ctx.val is not None else None
    test = measure(ctx.train.test_images, ctx.train.test_labels)
    ctx.confusion = test[2]
    row = _epoch_row(epoch + 1, sums, started, train_seconds, val, test)
    ctx.history.append(row)
    if dist_info.is_main:
        _save_epoch(ctx, row)
    return row


def _save_epoch(ctx: _Context, row: dict) -> None:
    """metrics.jsonl, best.safetensors when the validation accuracy improved (every epoch without a
    validation split), then last.safetensors, with the optimizer and RNG state for resume."""
    is_best = row["val_acc"] is None or row["val_acc"] > ctx.best_val
    if is_best:
        ctx.best_val, ctx.chosen = (row["val_acc"] if row["val_acc"] is not None else -1.0), row["epoch"]
    meta = {**ctx.meta, "epoch": row["epoch"], "metrics": row, "best_val_acc": ctx.best_val,
            "chosen_epoch": ctx.chosen}  # fmt: skip
    # last goes last: a run killed before it resumes from the previous epoch, drops this epoch's metrics
    # line and redoes the epoch, rewriting best the same way. Written first, last would make a resume skip
    # the metrics line and the best checkpoint of this epoch for good.
    ctx.metric_lines.append(json.dumps(row))
    runfolder.write_metrics(ctx.folder.metrics, ctx.metric_lines)
    if is_best:
        checkpoint.save(ctx.folder.best, ctx.net, meta)
    checkpoint.save(ctx.folder.last, ctx.net, meta, ctx.optimizer, ctx.rng.tensors())
    val = f"val acc {row['val_acc']:.4f} | " if row["val_acc"] is not None else ""
    ctx.say(
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | {val}"
        f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} | "
        f"{row['images_per_s']:,.0f} img/s, {row['seconds']:.1f} s"
    )


def _finish(ctx: _Context) -> None:
    """curves.png and confusion.png of the final model, where matplotlib is installed."""
    from lenet import plots

    if not (ctx.dist_info.is_main and ctx.history):
        return
    if not plots.available():
        ctx.say(plots.MISSING)
        return
    confusion = ctx.confusion
    if confusion is None:  # resumed after the last epoch: no epoch ran here
        images, labels = ctx.train.test_images, ctx.train.test_labels
        confusion = evaluate(ctx.eval_model, images, labels, ctx.mean, ctx.std)["confusion"]
    plots.training_plots(ctx.folder.path, confusion, ctx.train.classes)
