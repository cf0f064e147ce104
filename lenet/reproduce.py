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

from lenet import atomic, config, data
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
# The tutorial's own settings (Adam 1e-3, batch 256, 10 epochs, nothing else), on all 60,000 images.
TUTORIAL = dict(epochs=10, batch_size=256, optimizer="adam", lr=1e-3, schedule="constant", weight_decay=0.0,
                augment="none", val_split=0)  # fmt: skip
SGD = dict(optimizer="sgd", lr=0.1, momentum=0.9)  # a common default, not tuned (docs/improvements.md)
ALL_LAYERS = {"activation": "relu", "pool": "max", "batch_norm": True, "dropout": 0.25}


def _improvement(key: str, label: str, model: str, **overrides) -> Row:
    base = TUTORIAL if model == "classic" else {"val_split": 0}  # modern: its own recipe
    return Row(key, label, model, {**base, **overrides})


IMPROVEMENTS = (
    _improvement("tutorial", "classic, the tutorial's settings", "classic"),
    _improvement("relu", "+ ReLU", "classic", model_kwargs={"activation": "relu"}),
    _improvement("max-pool", "+ max pooling", "classic", model_kwargs={"pool": "max"}),
    _improvement("batch-norm", "+ batch norm", "classic", model_kwargs={"batch_norm": True}),
    _improvement("dropout", "+ dropout 0.25", "classic", model_kwargs={"dropout": 0.25}),
    _improvement("sgd", "SGD with momentum instead of Adam", "classic", **SGD),
    _improvement("schedule", "+ one-cycle schedule", "classic", schedule="one-cycle"),
    _improvement("distortions", "+ distortions (affine)", "classic", augment="affine"),
    _improvement(
        "all",
        "all of them (Adam)",
        "classic",
        model_kwargs=ALL_LAYERS,
        schedule="one-cycle",
        augment="affine",
    ),  # fmt: skip
    _improvement("modern", "modern, its recipe", "modern"),
    _improvement("modern-sigmoid", "- ReLU (sigmoid)", "modern", model_kwargs={"activation": "sigmoid"}),
    _improvement("modern-avg-pool", "- max pooling (average)", "modern", model_kwargs={"pool": "avg"}),
    _improvement("modern-no-bn", "- batch norm", "modern", model_kwargs={"batch_norm": False}),
    _improvement("modern-no-dropout", "- dropout", "modern", model_kwargs={"dropout": 0.0}),
    _improvement("modern-sgd", "SGD with momentum instead of AdamW", "modern", **SGD),
    _improvement("modern-constant-lr", "- schedule (constant lr)", "modern", schedule="constant"),
    _improvement("modern-no-distortions", "- distortions", "modern", augment="none"),
)
REPRODUCTIONS = dict(zip(config.REPRODUCTIONS, (LECUN1998, D2L, IMPROVEMENTS), strict=True))
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
NOTES["improvements"] = (
    "Each row changes one thing. The upper half starts from `classic` trained as the tutorial trains it "
    "(Adam at lr 1e-3, batch 256, 10 epochs, constant lr, no distortions) and adds one improvement; the "
    "lower "
    "half starts from `modern` with its default recipe (AdamW at peak lr 1e-2, one-cycle, weight decay "
    "5e-4, batch 128, affine distortions) and takes one away. All train on the 60,000 training images "
    "and report the test accuracy after the last epoch; epochs and seconds to 98% and 99% are the first "
    "epoch whose test accuracy reaches it (mean over the seeds that reach it; n of N says how many did). "
    "Seconds and images/s are wall time of training and evaluation; rows whose layers match `classic` or "
    "`modern` exactly train with the fused CPU kernels (kernel column), the others with plain PyTorch, so "
    "their speed says more about the code path than about the idea."
)
TITLES = {
    "lecun1998": "LeCun, Bottou, Bengio, Haffner 1998: MNIST test error",
    "d2l": "Dive into Deep Learning, LeNet chapter: Fashion-MNIST test accuracy",
    "improvements": "The tutorial's modern improvements, one at a time: MNIST test accuracy",
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


_NOT_COMPARED = ("resume", "overwrite", "device", "data_dir", "out")  # do not change what a run computes
# (out: a folder of runs may be moved, and is found by where it is now)


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
    return {**lines[-1], "wall_s": sum(x["seconds"] for x in lines), "epochs": cfg.epochs, "history": lines}


def _fmt_spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _header(name: str, results: dict[str, list[dict]], meta: dict) -> list[str]:
    """Title, command, date, machine and seeds of a report."""
    lines = [f"# Reproduction: {TITLES[name]}", ""]
    if meta["smoke"]:
        lines += [f"**Smoke run: {SMOKE_STEPS} batches per run. These numbers mean nothing.**", ""]
    return lines + [
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"Machine: {meta['machine']}.",
        "",
        f"Seeds: {', '.join(map(str, meta['seeds']))}. Wall time of all runs shown: "
        f"{sum(r['wall_s'] for runs in results.values() for r in runs) / 60:.1f} min "
        "(training and per-epoch test evaluation, summed over epochs).",
        "",
    ]


def _runs_table(rows: tuple[Row, ...], results: dict[str, list[dict]]) -> list[str]:
    lines = [
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
    return lines


def report(name: str, results: dict[str, list[dict]], meta: dict) -> str:
    """The Markdown report: summary table beside the published numbers, then every run."""
    if name == "improvements":
        return report_improvements(results, meta)
    error = name == "lecun1998"
    metric = "test error (%)" if error else "test accuracy"
    lines = _header(name, results, meta) + [
        f"| network | published {metric} | ours, mean ± sd over seeds | runs | epochs | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in REPRODUCTIONS[name]:
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
    return "\n".join([*lines, "", *_runs_table(REPRODUCTIONS[name], results), "", NOTES[name], ""])


def _first_reaching(history: list[dict], level: float) -> tuple[int, float] | None:
    """(epoch, seconds from the start) of the first epoch with test accuracy >= level, or None."""
    seconds = 0.0
    for row in history:
        seconds += row["seconds"]
        if row["test_acc"] >= level:
            return row["epoch"], seconds
    return None


def _time_to(runs: list[dict], level: float) -> str:
    reached = [hit for hit in (_first_reaching(r["history"], level) for r in runs) if hit]
    if not reached:
        return "not reached | -"
    count = "" if len(reached) == len(runs) else f" ({len(reached)} of {len(runs)})"
    epochs = statistics.fmean(e for e, _ in reached)
    return f"{epochs:.1f}{count} | {statistics.fmean(s for _, s in reached):.0f} s"


def _kernel(row: Row) -> str:
    """Whether this row's model trains with a fused CPU kernel here."""
    from lenet import fastcpu
    from lenet.models import build

    model = build(row.model, **row.overrides.get("model_kwargs", {}))
    return "fused" if fastcpu.fast_forward(model) is not None else "plain"


def report_improvements(results: dict[str, list[dict]], meta: dict) -> str:
    """The Markdown report of `lenet reproduce improvements`: one row per change, over the seeds."""
    lines = _header("improvements", results, meta)
    lines += [
        "| change | final test accuracy, mean ± sd | runs | epochs to 98% | seconds to 98% | epochs to 99% "
        "| seconds to 99% | images/s | kernel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in IMPROVEMENTS:
        runs = results.get(row.key, [])
        if not runs:
            lines.append(f"| {row.label} | not run | 0 | - | - | - | - | - | - |")
            continue
        accuracy = _fmt_spread([r["test_acc"] for r in runs], 4)
        speed = statistics.fmean(x["images_per_s"] for r in runs for x in r["history"])
        lines.append(
            f"| {row.label} | {accuracy} | {len(runs)} | {_time_to(runs, 0.98)} | {_time_to(runs, 0.99)} | "
            f"{speed:,.0f} | {_kernel(row)} |"
        )
    lines += [
        "",
        "![Test accuracy per epoch, mean over seeds](improvements.png)",
        "",
        NOTES["improvements"],
        "",
    ]
    lines += _runs_table(IMPROVEMENTS, results)
    return "\n".join(lines)


def _improvement_curves(results: dict[str, list[dict]], out: Path) -> None:
    """improvements.png: mean test accuracy per epoch of each row, classic's half beside modern's."""
    from lenet import plots

    if not plots.available():
        return
    panels: dict[str, dict[str, list[float]]] = {"classic + one change": {}, "modern - one change": {}}
    for row in IMPROVEMENTS:
        runs = results.get(row.key, [])
        if runs:
            epochs = min(len(r["history"]) for r in runs)
            mean = [statistics.fmean(r["history"][e]["test_acc"] for r in runs) for e in range(epochs)]
            panels[list(panels)[row.model == "modern"]][row.label] = mean
    plots.accuracy_curves(panels, out)


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
            cfg = TrainConfig(model=row.model, **overrides)
            if smoke:  # a few steps, and a validation split that a small test set can hold
                cfg = dataclasses.replace(
                    cfg, epochs=1, max_steps_per_epoch=SMOKE_STEPS, val_split=min(cfg.val_split, 64)
                )
            result[-1][1].append(cfg)
    return result


def write_report(name: str, plan: list, meta: dict, out: Path) -> dict[str, list[dict]]:
    """The report of what the plan's run folders hold now; returns the results it shows."""
    results = {}
    for row, cfgs in plan:
        parts = [(cfg, _finished_part(cfg)) for cfg in cfgs]
        results[row.key] = [
            {**part, "seed": cfg.seed, "command": train_command(cfg, row)} for cfg, part in parts if part
        ]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = report(name, results, {**meta, "date": date, "machine": machine()})
    atomic.write_bytes(out, (text + _kept_by_hand(out)).encode())
    return results


KEPT = "<!-- Below: written by hand from the tables above; kept when the report is written again. -->"


def _kept_by_hand(report_path: Path) -> str:
    """The part of an existing report from the KEPT line on (the reading of its numbers), or ""."""
    try:
        old = report_path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""
    at = old.find(KEPT)
    return "\n" + old[at:] if at >= 0 else ""


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
    report_name = "improvements" if name == "improvements" else f"reproduce-{name}"
    default_out = runs_dir / f"{report_name}-smoke.md" if smoke else Path(f"docs/{report_name}.md")
    out = Path(out) if out else default_out
    atomic.make_folder(out.parent)
    # the runs folder is this command's own: without resume, its runs are trained again from scratch
    plan = configs(
        name, seeds, smoke, runs_dir, device=device, data_dir=data_dir, resume=resume, overwrite=not resume
    )
    meta = {"command": f"lenet reproduce {name} --seeds {seeds}" + (" --smoke" if smoke else ""),
            "seeds": list(range(seeds)), "smoke": smoke}  # fmt: skip
    for row, cfgs in plan:
        if only is not None and row.key not in only:
            continue
        for cfg in cfgs:
            log(f"{row.label}, seed {cfg.seed}: {train_command(cfg, row)}")
            fit(cfg, log=log, dataset=dataset)
            write_report(name, plan, meta, out)
    results = write_report(name, plan, meta, out)
    if name == "improvements":
        _improvement_curves(results, out.with_suffix(".png"))
    log(f"report written to {out}")
    return out
