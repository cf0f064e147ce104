"""Data-parallel training under torchrun: 2 gloo processes on CPU over loopback."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lenet import checkpoint

pytestmark = pytest.mark.real_data


def torchrun(*args, env, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def lenet(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "lenet", *args], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_two_processes_end_with_the_same_weights_as_one(tmp_path, mnist_cache):
    env = {"LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}
    flags = ["train", "--epochs", "2", "--max-steps-per-epoch", "15", "--batch-size", "64", "--device", "cpu"]
    two = torchrun("-m", "lenet", *flags, "--out", str(tmp_path / "two"), env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone prints results
    assert "2 process(es), global batch 64" in two.stderr
    one = lenet(*flags, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr

    a = checkpoint.load(tmp_path / "one" / "last.safetensors")
    b = checkpoint.load(tmp_path / "two" / "last.safetensors")
    for name in a.model_state:
        torch.testing.assert_close(a.model_state[name], b.model_state[name], rtol=1e-4, atol=1e-5)
    assert a.meta["metrics"]["test_acc"] == pytest.approx(b.meta["metrics"]["test_acc"], abs=2e-3)
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # one line per epoch, not one per rank

    # A distributed checkpoint resumes in one process, and a single-process one under torchrun.
    resumed = lenet(*flags[:2], "3", *flags[3:], "--out", str(tmp_path / "two"), "--resume", env=env)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    resumed = torchrun(
        "-m", "lenet", *flags[:2], "3", *flags[3:], "--out", str(tmp_path / "one"), "--resume", env=env
    )
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) == 3


def test_two_processes_on_real_mnist_clear_the_single_process_floor(tmp_path, mnist_cache):
    env = {"LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}
    run = torchrun("-m", "lenet", "train", "--model", "modern", "--epochs", "1",
                   "--device", "cpu", "--out", str(tmp_path / "run"), env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    # The same floor as the single-process test in test_train.py.
    assert checkpoint.load(tmp_path / "run" / "last.safetensors").meta["metrics"]["test_acc"] >= 0.97
    flags = ["train", "--model", "modern", "--sync-batchnorm", "--device", "cpu"]
    run = torchrun("-m", "lenet", *flags, env=env)
    assert run.returncode != 0 and "lenet: error: --sync-batchnorm needs CUDA" in run.stderr


def test_a_failed_rank_ends_the_job_instead_of_hanging(tmp_path, mnist_cache):
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(f"""
        import os, sys
        from lenet import steps
        from lenet.config import TrainConfig
        from lenet.train import fit

        real_step = steps.train_step
        calls = []

        def failing_step(*args, **kwargs):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 5:
                raise RuntimeError("rank 1 fails on purpose")
            return real_step(*args, **kwargs)

        steps.train_step = failing_step
        fit(TrainConfig(epochs=1, device="cpu", out={str(tmp_path / "run")!r}), log=print)
    """)
    )
    started = time.perf_counter()
    result = torchrun(
        str(worker), env={"LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}, timeout=240
    )
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr
    assert time.perf_counter() - started < 120
