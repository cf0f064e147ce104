"""Faults a run must survive: SIGKILL at any moment, a full disk, a read-only output folder.

Every file lenet writes goes through lenet.atomic. Simulated faults (an OSError raised at one stage of one
file's write) run everywhere; real ones (a size-limited or read-only tmpfs, a chmod 0o555 folder) run
where the machine allows them and are skipped elsewhere.
"""

import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lenet import atomic, checkpoint, cli, data, plots
from lenet.errors import LenetError
from lenet.train import TrainConfig, fit

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
TIMING_KEYS = ("seconds", "images_per_s")


def quiet(_: str) -> None:
    pass


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.exists() else []


def metric_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def last_epoch(run: Path) -> int:
    path = run / "last.safetensors"
    return checkpoint.load(path).meta["epoch"] if path.exists() else 0


def assert_consistent(run: Path) -> None:
    """What a kill or a failed write may leave: loadable checkpoints, metrics for the epochs last holds
    plus at most the one being written when it stopped."""
    for path in run.glob("*.safetensors"):
        checkpoint.load(path)  # raises LenetError for a truncated or corrupt file
    epoch = last_epoch(run)
    assert metric_epochs(run) in (list(range(1, epoch + 1)), list(range(1, epoch + 2)))


def assert_same_run(run: Path, reference: Path) -> None:
    """Same final weights in last and best, same metrics apart from timings."""
    for name in ("last.safetensors", "best.safetensors"):
        a, b = checkpoint.load(run / name), checkpoint.load(reference / name)
        assert a.meta["epoch"] == b.meta["epoch"], name
        assert a.model_state.keys() == b.model_state.keys()
        for key in a.model_state:
            assert torch.equal(a.model_state[key], b.model_state[key]), f"{name}: {key}"

    def rows(folder: Path) -> list[dict]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]

    assert rows(run) == rows(reference)


# ---------------------------------------------------------------------------------------------------------
# Simulated write failures


def inject(monkeypatch: pytest.MonkeyPatch, name: str, stage: str, err: int = errno.ENOSPC, nth: int = 1):
    """Make the nth atomic write of a file called `name` fail with OSError(err) at `stage`: "create" (the
    temp file), "write" (half the bytes written, then the error), "fsync" or "rename"."""
    real_mkstemp, real_fdopen, real_fsync, real_replace = tempfile.mkstemp, os.fdopen, os.fsync, os.replace
    writes = itertools.count(1)
    doomed: dict[str, object] = {}  # "fd" and "tmp" of the write that is to fail

    def error() -> OSError:
        return OSError(err, os.strerror(err))

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if prefix == f".{name}." and next(writes) == nth:
            if stage == "create":
                raise error()
            doomed["fd"], doomed["tmp"] = real_mkstemp(suffix, prefix, dir, text)
            return doomed["fd"], doomed["tmp"]
        return real_mkstemp(suffix, prefix, dir, text)

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, chunk) -> int:
            self.f.write(bytes(chunk)[: len(chunk) // 2])
            raise error()

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return FullFile(f) if stage == "write" and doomed.get("fd") == fd else f

    def fsync(fd) -> None:
        if stage == "fsync" and doomed.get("fd") == fd:
            raise error()
        real_fsync(fd)

    def replace(src, dst) -> None:
        if stage == "rename" and doomed.get("tmp") == src:
            raise error()
        real_replace(src, dst)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


STAGE_ERRORS = [
    ("create", errno.ENOSPC),
    ("create", errno.EROFS),
    ("create", errno.EACCES),
    ("write", errno.ENOSPC),
    ("fsync", errno.ENOSPC),
    ("fsync", errno.EIO),
    ("rename", errno.ENOSPC),
]


@pytest.mark.parametrize("stage, err", STAGE_ERRORS)
def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temp_file(
    tmp_path, monkeypatch, stage, err
):
    path = tmp_path / "model.bin"
    atomic.write_bytes(path, b"old")
    inject(monkeypatch, "model.bin", stage, err)
    with pytest.raises(atomic.WriteError) as info:
        atomic.write_bytes(path, b"new" * 100_000)
    assert str(info.value) == f"{path}: cannot write ({os.strerror(err)})"
    assert isinstance(info.value, LenetError)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_a_rejected_check_passes_its_error_through_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "export.onnx"
    path.write_bytes(b"old")

    def reject(tmp: Path) -> dict:
        assert tmp.parent == tmp_path and tmp.read_bytes() == b"bad"
        raise LenetError(f"{path}: differs from PyTorch")

    with pytest.raises(LenetError, match="differs from PyTorch"):
        atomic.write(path, lambda f: f.write(b"bad"), reject)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["export.onnx"]
    assert atomic.write(path, lambda f: f.write(b"good"), lambda tmp: {"checked": tmp.read_bytes()}) == {
        "checked": b"good"
    }
    assert path.read_bytes() == b"good"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic.write_bytes(tmp_path / "a", b"x")
        with open(tmp_path / "b", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    names = [
        ".last.safetensors.abcd1234.tmp",
        ".metrics.jsonl.x_y_z_00.tmp",
        ".notes.txt.abcd1234.tmp",
        "a.tmp",
    ]
    for name in [*names, "last.safetensors"]:
        (tmp_path / name).write_bytes(b"")
    removed = atomic.remove_leftovers(tmp_path, ["last.safetensors", "metrics.jsonl"])
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted([*names[2:], "last.safetensors"])
    assert atomic.remove_leftovers(tmp_path / "missing", ["last.safetensors"]) == []


# ---------------------------------------------------------------------------------------------------------
# The CLI under write failures, in process, on the small synthetic set


@pytest.fixture
def tiny_cli(monkeypatch, tiny_dataset, capsys):
    """Runs `lenet ARGS` in this process on tiny_dataset; returns (exit status, stderr)."""
    monkeypatch.setattr(data, "load", lambda *args, **kwargs: tiny_dataset)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        status = cli.main(list(args))
        return status, capsys.readouterr().err

    return run


TRAIN = (
    "train",
    "--model",
    "classic",
    "--batch-size",
    "16",
    "--lr",
    "0.01",
    "--device",
    "cpu",
    "--val-split",
    "0",
)


@pytest.mark.parametrize(
    "name, nth",
    [
        ("config.json", 1),
        ("metrics.jsonl", 3),  # the rewrite at start, epoch 1, then epoch 2's line
        ("best.safetensors", 1),
        ("last.safetensors", 2),
        ("curves.png", 1),  # after training, with every checkpoint written
    ],
)
def test_train_on_a_full_disk_says_which_file_in_one_line_and_leaves_loadable_checkpoints(
    tmp_path, monkeypatch, tiny_cli, name, nth
):
    if name == "curves.png" and not plots.available():
        pytest.skip("plots need matplotlib")
    run = tmp_path / "run"
    inject(monkeypatch, name, "write", nth=nth)
    status, err = tiny_cli(*TRAIN, "--epochs", "2", "--out", str(run))
    assert status == 2
    assert err.splitlines()[-1] == f"lenet: error: {run / name}: cannot write ({ENOSPC})"
    assert temp_files(run) == []
    assert_consistent(run)
    expected_epoch = {"config.json": 0, "metrics.jsonl": 1, "best.safetensors": 0, "last.safetensors": 1}
    assert last_epoch(run) == expected_epoch.get(name, 2)


def test_a_checkpoint_write_that_fails_keeps_the_previous_checkpoint_byte_for_byte(
    tmp_path, monkeypatch, tiny_cli
):
    run = tmp_path / "run"
    assert tiny_cli(*TRAIN, "--epochs", "1", "--out", str(run))[0] == 0
    before = (run / "last.safetensors").read_bytes()
    inject(monkeypatch, "last.safetensors", "fsync")
    status, err = tiny_cli(*TRAIN, "--epochs", "2", "--out", str(run), "--resume")
    assert status == 2 and err.splitlines()[-1].endswith(f"last.safetensors: cannot write ({ENOSPC})")
    assert (run / "last.safetensors").read_bytes() == before and temp_files(run) == []


def test_export_to_a_full_disk_keeps_the_old_export_and_leaves_no_temp_file(tmp_path, monkeypatch, tiny_cli):
    run = tmp_path / "run"
    assert tiny_cli(*TRAIN, "--epochs", "1", "--out", str(run))[0] == 0
    out = tmp_path / "exports" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    inject(monkeypatch, "model.pt", "write")
    status, err = tiny_cli(
        "export", str(run / "best.safetensors"), "--format", "torchscript", "--out", str(out)
    )
    assert status == 2 and err == f"lenet: error: {out}: cannot write ({ENOSPC})\n"
    assert os.listdir(out.parent) == ["model.pt"] and out.read_bytes() == b"the previous export"


@pytest.fixture
def small_spec(tmp_path, monkeypatch) -> Path:
    """A dataset "small" of 8 + 4 images registered in DATASETS, its files in a folder; returns the folder."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 8, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    folder = tmp_path / "source"
    folder.mkdir()
    files = {}
    for role, array in arrays.items():
        name = data.DATASETS["mnist"].files[role].name
        data.write_idx(folder / name, array)
        raw = (folder / name).read_bytes()
        files[role] = data.FileSpec(name, len(raw), hashlib.sha256(raw).hexdigest(), array.shape)
    spec = data.DatasetSpec("small", data.DATASETS["mnist"].classes, files, mirrors=(), mean=0.5, std=0.25)
    monkeypatch.setitem(data.DATASETS, "small", spec)
    monkeypatch.setenv("LENET_OFFLINE", "1")
    return folder


@pytest.mark.parametrize("stage", ["create", "write", "fsync"])
def test_a_full_disk_while_caching_data_is_one_line_and_leaves_no_partial_file(
    tmp_path, monkeypatch, small_spec, stage
):
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "cache"))
    inject(monkeypatch, "train-images-idx3-ubyte", stage)
    with pytest.raises(data.DataError) as info:
        data.load("small", data_dir=small_spec)
    assert str(info.value) == (
        f"small: cannot write the cache {tmp_path / 'cache' / 'small'}: {ENOSPC} "
        "(set LENET_DATA_DIR to a writable folder)"
    )
    assert "train-images-idx3-ubyte" not in os.listdir(tmp_path / "cache" / "small")
    assert temp_files(tmp_path / "cache" / "small") == []


def test_plots_on_a_full_disk_name_the_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    inject(monkeypatch, "confusion.png", "write")
    path = tmp_path / "confusion.png"
    with pytest.raises(LenetError) as info:
        plots.confusion(torch.eye(3, dtype=torch.int64), ["a", "b", "c"], path)
    assert str(info.value) == f"{path}: cannot write ({ENOSPC})"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# A crash at each point between writes, in process: where SIGKILL (below) lands by chance, this takes every
# rename of a 3-epoch run in turn and makes it the point where the run dies.


class Crash(BaseException):
    """Stands for the process dying: nothing in lenet catches it (the temp file's cleanup still runs)."""


def test_a_crash_before_any_rename_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.setattr(plots, "available", lambda: False)

    def config(out: Path, **overrides) -> TrainConfig:
        return TrainConfig(
            model="classic",
            epochs=3,
            batch_size=16,
            lr=0.01,
            out=str(out),
            device="cpu",
            val_split=100,
            **overrides,
        )

    real_replace = os.replace
    renamed: list[str] = []

    def recording(src, dst) -> None:
        real_replace(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", recording)
    fit(config(tmp_path / "reference"), log=quiet, dataset=tiny_dataset)
    # epoch 3 improves the test accuracy (epochs 1 and 2 stay at chance on this set): it writes all three
    assert renamed[-3:] == ["metrics.jsonl", "best.safetensors", "last.safetensors"]
    for crash_at in range(len(renamed)):
        out = tmp_path / f"crash-before-rename-{crash_at}"
        calls = itertools.count()

        def crashing(src, dst, crash_at=crash_at, calls=calls) -> None:
            if next(calls) == crash_at:
                raise Crash
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crashing)
        with pytest.raises(Crash):
            fit(config(out), log=quiet, dataset=tiny_dataset)
        monkeypatch.setattr(os, "replace", real_replace)
        assert_consistent(out)
        fit(config(out, resume=True), log=quiet, dataset=tiny_dataset)
        assert_same_run(out, tmp_path / "reference")


# ---------------------------------------------------------------------------------------------------------
# Real file systems: a size-limited tmpfs and a read-only folder (where this machine allows them)


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted on a fresh folder; skipped where mounting needs privileges this user lacks."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill folder's file system up to `leave` free bytes."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_real_full_disk_stops_training_with_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, tmpfs, tiny_cli, monkeypatch
):
    monkeypatch.setattr(plots, "available", lambda: False)
    run = tmpfs / "run"
    assert tiny_cli(*TRAIN, "--epochs", "1", "--out", str(run))[0] == 0
    before = (run / "last.safetensors").read_bytes()
    # room for config, metrics and best (without optimizer state), not for last (with it)
    filler = fill(tmpfs, (run / "best.safetensors").stat().st_size + 64 * 1024)
    status, err = tiny_cli(*TRAIN, "--epochs", "2", "--out", str(run), "--resume")
    assert (
        status == 2
        and err.splitlines()[-1] == f"lenet: error: {run / 'last.safetensors'}: cannot write ({ENOSPC})"
    )
    assert (run / "last.safetensors").read_bytes() == before and temp_files(run) == []
    assert_consistent(run)
    filler.unlink()
    assert tiny_cli(*TRAIN, "--epochs", "2", "--out", str(run), "--resume")[0] == 0
    assert last_epoch(run) == 2 and metric_epochs(run) == [1, 2]


@pytest.fixture
def read_only(tmp_path) -> Iterator[tuple[Path, Callable[[], object]]]:
    """(folder, lock): lock() makes folder and the folders in it read-only for this process, by chmod 0o555
    for a normal user, or by remounting a tmpfs read-only for root (root ignores permissions)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:

        def chmod_all(mode: int) -> None:
            for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
                path.chmod(mode)

        try:
            yield folder, lambda: chmod_all(0o555)
        finally:
            chmod_all(0o755)
        return
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)):
        pytest.skip("running as root without mount: root writes into any folder")

    def remount() -> None:
        assert _mount("-o", "remount,ro", str(folder))

    try:
        yield folder, remount
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_read_only_output_folders_give_one_line_errors_and_change_nothing(read_only, tiny_cli, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    folder, lock = read_only
    run = folder / "run"
    assert tiny_cli(*TRAIN, "--epochs", "1", "--out", str(run))[0] == 0
    snapshot = {p.name: p.read_bytes() for p in run.iterdir()}
    lock()
    cause = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    status, err = tiny_cli(*TRAIN, "--epochs", "2", "--out", str(run), "--resume")
    assert (status, err.splitlines()[-1]) == (
        2,
        f"lenet: error: {run / 'config.json'}: cannot write ({cause})",
    )
    status, err = tiny_cli(*TRAIN, "--epochs", "1", "--out", str(folder / "new" / "run"))
    assert (status, err) == (
        2,
        f"lenet: error: {folder / 'new' / 'run'}: cannot create the folder ({cause})\n",
    )
    out = folder / "model.pt"
    status, err = tiny_cli(
        "export", str(run / "best.safetensors"), "--format", "torchscript", "--out", str(out)
    )
    assert (status, err) == (2, f"lenet: error: {out}: cannot write ({cause})\n")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == snapshot
    assert sorted(os.listdir(folder)) == ["run"]


def test_a_read_only_data_cache_is_one_line_with_a_hint(read_only, small_spec, monkeypatch):
    folder, lock = read_only
    lock()
    monkeypatch.setenv("LENET_DATA_DIR", str(folder / "cache"))
    cause = os.strerror(errno.EROFS if os.geteuid() == 0 else errno.EACCES)
    with pytest.raises(data.DataError) as info:
        data.load("small", data_dir=small_spec)
    assert str(info.value) == (
        f"small: cannot write the cache {folder / 'cache' / 'small'}: {cause} "
        "(set LENET_DATA_DIR to a writable folder)"
    )


# ---------------------------------------------------------------------------------------------------------
# SIGKILL: `lenet train` in a child process, killed at random points and resumed each time

KILL_EPOCHS = 3
KILL_TRAIN = (
    "train", "--model", "classic", "--epochs", str(KILL_EPOCHS), "--batch-size", "32",
    "--max-steps-per-epoch", "8", "--device", "cpu", "--resume",
)  # fmt: skip
# where each kill is aimed: at a random moment of start-up, of training, or when a new temp file of
# last.safetensors appears (the checkpoint is being written)
KILL_PLAN = ("startup", "write", "training", "write", "training", "write", "training")


@pytest.fixture(scope="module")
def mnist_shaped_cache(tmp_path_factory, tiny_dataset) -> Path:
    """A data cache holding tiny_dataset tiled to MNIST's shapes (60000 + 10000 images): a load from the cache
    checks header and shape (not the real files' sha256), so a `lenet train` child process takes it."""
    root = tmp_path_factory.mktemp("mnist-shaped")
    (root / "mnist").mkdir()
    for role, spec in data.DATASETS["mnist"].files.items():
        tensor = getattr(tiny_dataset, role)
        tiled = tensor.repeat(-(-spec.shape[0] // len(tensor)), *[1] * (tensor.ndim - 1))[: spec.shape[0]]
        data.write_idx(root / "mnist" / spec.name, tiled.numpy().astype(np.uint8))
    return root


def launch(run: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "lenet", *KILL_TRAIN, "--out", str(run)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def kill_at_new_temp_file(proc: subprocess.Popen, run: Path, nth: int) -> None:
    """SIGKILL as soon as the nth new .last.safetensors.*.tmp of this process appears."""
    old, seen = set(temp_files(run)), set()
    while proc.poll() is None:
        seen |= {name for name in temp_files(run) if name.startswith(".last.safetensors.")} - old
        if len(seen) >= nth:
            proc.kill()
            return
        time.sleep(0.0001)


def kill_after(proc: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)
    if proc.poll() is None:
        proc.kill()


def wait_for_line(proc: subprocess.Popen, log: Path, start: str) -> None:
    while proc.poll() is None and not any(line.startswith(start) for line in log.read_text().splitlines()):
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_ends_with_the_uninterrupted_runs_weights(
    tmp_path, mnist_shaped_cache
):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LENET_DATA_DIR": str(mnist_shaped_cache),
        "LENET_OFFLINE": "1",
    }
    reference = tmp_path / "reference"
    assert launch(reference, env, tmp_path / "reference.log").wait(timeout=600) == 0
    epoch_seconds = max(json.loads(line)["seconds"] for line in (reference / "metrics.jsonl").open())
    run, rng, phases = tmp_path / "run", random.Random(5), Counter()
    for i, aim in enumerate(KILL_PLAN):
        epoch_before, temps_before = last_epoch(run), set(temp_files(run))
        if epoch_before == KILL_EPOCHS:
            break
        log = tmp_path / f"launch-{i}.log"
        proc = launch(run, env, log)
        if aim == "startup":
            kill_after(proc, rng.uniform(0.0, 1.5))
        elif aim == "write":
            kill_at_new_temp_file(proc, run, rng.randint(1, KILL_EPOCHS - epoch_before))
        else:
            wait_for_line(proc, log, "training ")
            kill_after(proc, rng.uniform(0.0, (KILL_EPOCHS - epoch_before) * epoch_seconds))
        assert proc.wait(timeout=600) in (0, -signal.SIGKILL), log.read_text()
        text, left = log.read_text(), sorted(set(temp_files(run)) - temps_before)
        if proc.returncode == 0:
            phase = "after the run finished"
        elif left:
            phase = "writing " + ", ".join(name[1:].rsplit(".", 2)[0] for name in left)
        elif "\ntraining " not in f"\n{text}":
            phase = "starting up"
        else:
            phase = "training, no write in progress"
        phases[phase] += 1
        assert_consistent(run)
        # nothing reported as done is lost: only the epoch in progress can be
        done = [int(line.split()[1].rstrip(":")) for line in text.splitlines() if line.startswith("epoch ")]
        assert last_epoch(run) >= max(done, default=epoch_before) >= epoch_before, (phase, text)
        if "resuming" in text:
            assert f"after epoch {epoch_before}" in text
    print(f"\nSIGKILL phases ({sum(phases.values())} launches): {dict(phases)}")
    assert phases["writing last.safetensors"] >= 1 and phases["training, no write in progress"] >= 1
    # the run may already hold every epoch (killed after its last write): resuming it must still succeed
    final_log = tmp_path / "final.log"
    assert launch(run, env, final_log).wait(timeout=600) == 0, final_log.read_text()
    assert temp_files(run) == []  # leftovers of killed writes are removed when a run starts
    assert_same_run(run, reference)
