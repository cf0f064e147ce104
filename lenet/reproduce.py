"""`lenet reproduce`: train the published networks with their published recipes and write our numbers
beside the published ones as a Markdown report.

- lecun1998: LeNet-1, LeNet-4 and LeNet-5 (without and with distortions) on MNIST, against the test errors
  of LeCun, Bottou, Bengio and Haffner 1998 (1.7%, 1.1%, 0.95%, 0.8%).
- d2l: the "Dive into Deep Learning" LeNet chapter (classic network, Xavier init, SGD lr 0.9, batch 256,
  10 epochs on Fashion-MNIST; the book reports test accuracy 0.779), beside our default recipe for
  `modern` on Fashion-MNIST.

Each run trains through `train.fit` into its own folder under runs_dir; the report is rewritten after
every run, so an interrupted reproduction leaves the rows it finished (and `resume` continues it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from lenet import atomic, data
from lenet.config import TrainConfig, command_line
from lenet.errors import LenetError
from lenet.train import fit

SMOKE_STEPS = 3  # batches per run in smoke mode


@dataclass(frozen=True)
class Row:
    key: str  # run folder prefix
    label: str
    model: str
    overrides: dict = field(default_factory=dict)  # TrainConfig fields on top of the model's recipe
    published: float = 0.0  # test error (lecun1998) or accuracy (d2l) as published
    target: str = ""
    met: Callable[[float, float], bool] = lambda ours, published: True


LECUN1998 = (
    Row("lenet1", "LeNet-1", "lenet1", {}, 1.7, "within 0.3 points", lambda o, p: abs(o - p) <= 0.3),
    Row("lenet4", "LeNet-4", "lenet4", {}, 1.1, "within 0.3 points", lambda o, p: abs(o - p) <= 0.3),
    Row("lenet5", "LeNet-5", "lenet5-1998", {}, 0.95, "<= 0.95%", lambda o, p: o <= 0.95),
    Row(
        "lenet5-distorted",
        "LeNet-5, distortions",
        "lenet5-1998",
        {"augment": "affine"},
        0.8,
        "<= 0.8%",
        lambda o, p: o <= 0.8,
    ),
)
D2L_RECIPE = dict(
    dataset="fashion-mnist",
    epochs=10,
    batch_size=256,
    optimizer="sgd",
    lr=0.9,
    momentum=0.0,
    schedule="constant",
    weight_decay=0.0,
    val_split=0,  # the book trains on all 60,000 images and reports the last epoch
)
D2L = (
    Row("d2l-classic", "d2l LeNet (classic, SGD 0.9)", "classic", D2L_RECIPE, 0.779, "within 2 points",
        lambda o, p: abs(o - p) <= 0.02),
    Row("modern", "modern, our default recipe", "modern", {"dataset": "fashion-mnist"}, 0.0, ">= 0.91",
        lambda o, p: o >= 0.91),
)  # fmt: skip
REPRODUCTIONS = {"lecun1998": LECUN1998, "d2l": D2L}
NOTES = {
    "lecun1998": (
        "Our networks and training follow the paper; where it is silent, ambiguous or unstable here "
        "(initialisation, the MAP constant j, the output bitmaps, batches of 16 (LeNet-1: 8) instead of "
        "single samples, the distortion ranges, LeNet-1's and LeNet-4's connection tables) "
        "`docs/lenet5-1998.md` says what we chose and why, and what each choice changed. Our numbers are "
        "the test error after the last pass, never the best pass."
    ),
    "d2l": (
        "The book's recipe: `classic` (sigmoid, average pooling) with Xavier-uniform weights, SGD without "
        "momentum at lr 0.9, batch 256, 10 epochs. Differences: our inputs are normalised with the dataset's "
        "mean and standard deviation (the book feeds pixels in [0, 1]), biases start at zero, and the last "
        "partial batch of each epoch is dropped. `modern` uses its default recipe (`lenet train --model "
        "modern --dataset fashion-mnist`). Our numbers are the test accuracy after the last epoch."
    ),
}
TITLES = {
    "lecun1998": "LeCun, Bottou, Bengio, Haffner 1998: MNIST test error",
    "d2l": "Dive into Deep Learning, LeNet chapter: Fashion-MNIST test accuracy",
}


def machine() -> str:
    """CPU model, cores, threads and torch version, for people reading the report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}){gpu}, "
        f"Python {platform.python_version()}, {platform.system()}"
    )


def train_command(cfg: TrainConfig, row: Row) -> str:
    """The `lenet train` line that repeats one run (the model's recipe plus the row's overrides)."""
    return command_line(cfg, [*row.overrides, "seed", "out"])


_NOT_COMPARED = ("resume", "overwrite", "device", "data_dir")  # do not change what a run computes


def _finished_part(cfg: TrainConfig) -> dict | None:
    """What cfg's run folder holds so far: the last epoch's metrics and the summed epoch wall time, or
    None when there is no run of exactly this configuration there (absent, or another code version)."""
    folder = Path(cfg.out)
    try:
        stored = json.loads((folder / "config.json").read_text())
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    # fields added to TrainConfig after the run was made are not held against it
    wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_COMPARED and k in stored}
    if not lines or any(stored[k] != v for k, v in wanted.items()):
        return None
    return {**lines[-1], "wall_s": sum(x["seconds"] for x in lines), "epochs": cfg.epochs}


def _fmt_spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(name: str, results: dict[str, list[dict]], meta: dict) -> str:
    """The Markdown report: summary table beside the published numbers, then every run."""
    error = name == "lecun1998"
    rows = REPRODUCTIONS[name]
    lines = [f"# Reproduction: {TITLES[name]}", ""]
    if meta["smoke"]:
        lines += [f"**Smoke run: {SMOKE_STEPS} batches per run. These numbers mean nothing.**", ""]
    lines += [
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"Machine: {meta['machine']}.",
        "",
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Wall time of all runs shown: "
        f"{sum(r['wall_s'] for runs in results.values() for r in runs) / 60:.1f} min "
        "(training and per-epoch test evaluation, summed over epochs).",
        "",
    ]
    metric = "test error (%)" if error else "test accuracy"
    lines += [
        f"| network | published {metric} | ours, mean ± sd over seeds | runs | epochs | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        done = results.get(row.key, [])
        published = (f"{row.published:.2f}" if error else f"{row.published:.3f}") if row.published else "-"
        if not done:
            lines.append(f"| {row.label} | {published} | not run | 0 | - | {row.target} | - |")
            continue
        values = [100 * (1 - r["test_acc"]) if error else r["test_acc"] for r in done]
        ours = _fmt_spread(values, 2 if error else 3)
        epochs = ", ".join(
            sorted(
                {f"{r['epoch']}" + (f" of {r['epochs']}" if r["epoch"] < r["epochs"] else "") for r in done}
            )
        )
        met = "yes" if row.met(statistics.fmean(values), row.published) else "no"
        if any(r["epoch"] < r["epochs"] for r in done):
            met = "unfinished"
        lines.append(
            f"| {row.label} | {published} | {ours} | {len(done)} | {epochs} | {row.target} | {met} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| network | seed | test error (%) | test accuracy | epochs | wall time | command |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for r in results.get(row.key, []):
            lines.append(
                f"| {row.label} | {r['seed']} | {100 * (1 - r['test_acc']):.2f} | {r['test_acc']:.4f} | "
                f"{r['epoch']} of {r['epochs']} | {r['wall_s'] / 60:.1f} min | `{r['command']}` |"
            )
    lines += ["", NOTES[name], ""]
    return "\n".join(lines)


def configs(
    name: str, seeds: int, smoke: bool, runs_dir: str | Path, **common
) -> list[tuple[Row, list[TrainConfig]]]:
    """The TrainConfig of every run of reproduction `name`: the row's recipe, seeds 0..seeds-1."""
    result = []
    for row in REPRODUCTIONS[name]:
        result.append((row, []))
        for seed in range(seeds):
            overrides = {
                **row.overrides,
                **common,
                "seed": seed,
                "out": str(Path(runs_dir) / f"{row.key}-seed{seed}"),
            }
            if smoke:
                overrides.update(epochs=1, max_steps_per_epoch=SMOKE_STEPS)
            result[-1][1].append(TrainConfig(model=row.model, **overrides))
    return result


def run(
    name: str,
    seeds: int = 1,
    smoke: bool = False,
    runs_dir: str | Path = "runs/reproduce",
    out: str | Path | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    resume: bool = False,
    only: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
    dataset: data.Dataset | None = None,
) -> Path:
    """Train the runs of reproduction `name` (seeds 0..seeds-1) and write the report; returns its path.

    smoke: SMOKE_STEPS batches of one epoch per run (tests). only: keys of the rows to train (default all);
    the report still shows every row whose run folders hold runs of exactly this configuration, finished
    or not (the epochs column says how far they got), so rows can be trained by separate processes.
    resume: continue each run from its folder's last checkpoint. dataset: used instead of loading each
    row's dataset (tests). The report goes to `out`, by default docs/reproduce-NAME.md
    (runs_dir/reproduce-NAME-smoke.md in smoke mode).
    """
    if name not in REPRODUCTIONS:
        raise LenetError(f"unknown reproduction {name!r}: expected one of {', '.join(REPRODUCTIONS)}")
    if seeds < 1:
        raise LenetError(f"--seeds must be at least 1, got {seeds}")
    keys = [row.key for row in REPRODUCTIONS[name]]
    if only is not None and not set(only) <= set(keys):
        raise LenetError(f"--only: expected keys among {', '.join(keys)}, got {', '.join(only)}")
    runs_dir = Path(runs_dir)
    default_out = runs_dir / f"reproduce-{name}-smoke.md" if smoke else Path(f"docs/reproduce-{name}.md")
    out = Path(out) if out else default_out
    atomic.make_folder(out.parent)
    # the runs folder is this command's own: without resume, its runs are trained again from scratch
    plan = configs(
        name, seeds, smoke, runs_dir, device=device, data_dir=data_dir, resume=resume, overwrite=not resume
    )
    command = f"lenet reproduce {name} --seeds {seeds}" + (" --smoke" if smoke else "")

    def write_report() -> None:
        results = {}
        for row, cfgs in plan:
            parts = [(cfg, _finished_part(cfg)) for cfg in cfgs]
            results[row.key] = [
                {**part, "seed": cfg.seed, "command": train_command(cfg, row)} for cfg, part in parts if part
            ]
        meta = {
            "command": command,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "seeds": list(range(seeds)),
            "smoke": smoke,
        }
        atomic.write_bytes(out, report(name, results, meta).encode())

    for row, cfgs in plan:
        if only is not None and row.key not in only:
            continue
        for cfg in cfgs:
            log(f"{row.label}, seed {cfg.seed}: {train_command(cfg, row)}")
            fit(cfg, log=log, dataset=dataset)
            write_report()
    write_report()
    log(f"report written to {out}")
    return out
