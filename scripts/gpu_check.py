"""Every GPU check in one run, for a machine with a CUDA GPU; prints one table at the end.

    python scripts/gpu_check.py [--out FOLDER]

1. the CUDA tests (`pytest -m cuda`);
2. `lenet bench train --device cuda --json`: our training beside the tutorial's loop on the same GPU;
3. `lenet train --model classic|modern --device cuda`, timed from launch (imports, data, graph capture
   included): wall seconds to the first epoch at 99.0% and 99.3% test accuracy, training seconds (the sum of
   the epochs' own seconds, evaluation excluded), images/s, final test accuracy;
4. a short profile of modern's steps: time in kernels against wall time, and the kernels that take it.

Everything it measures is printed; nothing is estimated. Each part that fails says so in the table and the
rest still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str], timeout: float = 900) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - started
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def timed_train(model: str, out: Path) -> dict:
    """`lenet train` from launch; seconds are wall time since launch at the end of each epoch."""
    started = time.perf_counter()
    code, log, wall = run([sys.executable, "-m", "lenet", "train", "--model", model, "--device", "cuda",
                           "--out", str(out), "--overwrite"])  # fmt: skip
    if code != 0:
        return {"error": log.strip().splitlines()[-1] if log.strip() else f"exit {code}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    per_epoch = (60_000 - config["val_split"]) // config["batch_size"] * config["batch_size"]
    startup = wall - sum(r["seconds"] for r in rows)  # launch to the first step: imports, data, capture
    elapsed, train_seconds, reached = startup, 0.0, {}
    for row in rows:
        elapsed += row["seconds"]  # training and the epoch's evaluation
        train_seconds += per_epoch / row["images_per_s"]  # training alone
        for level in (0.99, 0.993):
            if level not in reached and row["test_acc"] >= level:
                reached[level] = {
                    "epoch": row["epoch"],
                    "wall_s": round(elapsed, 2),
                    "train_s": round(train_seconds, 2),
                }
    return {
        "final_test_acc": rows[-1]["test_acc"],
        "wall_s": round(wall, 2),
        "startup_s": round(startup, 2),
        "images_per_s": max(r["images_per_s"] for r in rows),
        "to_99.0": reached.get(0.99),
        "to_99.3": reached.get(0.993),
        "since": round(time.perf_counter() - started, 1),
    }


def profile_modern() -> dict:
    """Kernel time against wall time over 200 captured steps of modern at its recipe's batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import lenet
    from lenet import steps
    from lenet.config import TrainConfig
    from lenet.train import make_optimizer

    cfg = TrainConfig(model="modern", device="cuda")
    net = lenet.build("modern").cuda().train()
    step, _ = steps.make_step(cfg, net, make_optimizer(cfg, net), 0.13, 0.31, torch.device("cuda"), 1)
    images = torch.randint(0, 255, (cfg.batch_size, 28, 28), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (cfg.batch_size,), device="cuda")
    for _ in range(10):
        step(images, labels, 1e-3, 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(200):
            step(images, labels, 1e-3, 1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:5]
    return {
        "step_us": round(wall / 200 * 1e6, 1),
        "kernel_us_per_step": round(kernel_us / 200, 1),
        "kernel_share": round(kernel_us / 200 / (wall / 200 * 1e6), 3),
        "images_per_s": round(200 * cfg.batch_size / wall),
        "top_kernels": [(e.key[:60], round(e.self_device_time_total / 200, 1)) for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="lenet-gpu-"))
    table: dict[str, object] = {}
    code, log, wall = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "tests/test_cuda.py"])
    table["cuda tests"] = f"{log.strip().splitlines()[-1] if log.strip() else 'no output'} ({wall:.0f} s)"
    code, log, _ = run([sys.executable, "-m", "lenet", "bench", "train", "--device", "cuda", "--json"])
    table["bench train --device cuda"] = json.loads(log.strip().splitlines()[-1]) if code == 0 else log[-400:]
    for model in ("classic", "modern"):
        table[f"lenet train --model {model} --device cuda"] = timed_train(model, folder / model)
    try:
        table["profile, modern steps"] = profile_modern()
    except Exception as e:  # a part that fails is reported, the table still printed
        table["profile, modern steps"] = f"failed: {e}"
    import torch

    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for name, value in table.items():
        print(f"{name}:")
        for line in json.dumps(value, indent=2).splitlines():
            print(f"    {line}")


if __name__ == "__main__":
    main()
