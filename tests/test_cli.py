import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lenet import fastcpu


def lenet(*args, env=None, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "lenet", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"lenet {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def test_help_and_argument_errors_answer_without_importing_torch():
    code = "import sys, lenet.cli; lenet.cli.build_parser().format_help(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
    started = time.perf_counter()
    result = lenet("train", "--epochs", "many", check=False)
    assert result.returncode == 2 and "--epochs: invalid int value" in result.stderr
    assert time.perf_counter() - started < 5  # generous for a loaded CI machine; typically ~0.1 s
    assert "summary" in lenet("--help").stdout


def test_the_train_flags_are_the_config_fields():
    from lenet.cli import build_parser
    from lenet.config import TrainConfig, flag_fields

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions if a.option_strings and a.dest != "help"}
    assert flags == {f.name for f in flag_fields()}
    assert flags == set(TrainConfig.__dataclass_fields__)


def test_one_list_of_models_and_datasets():
    from lenet import config, data, models

    assert tuple(models._BUILDERS) == config.MODELS
    assert tuple(data.DATASETS) == config.DATASETS


def test_summary_prints_the_tutorial_shapes():
    out = lenet("summary", "--model", "classic").stdout
    shapes = [line.split()[2] for line in out.splitlines()[2:-1]]
    assert shapes == [
        "6x28x28", "6x28x28", "6x14x14", "16x10x10", "16x10x10", "16x5x5",
        "400", "120", "120", "84", "84", "10",
    ]  # fmt: skip
    assert out.splitlines()[-1].split() == ["total", "61,706"]


def test_summary_with_another_batch_and_an_input_size_that_does_not_fit():
    out = lenet("summary", "--model", "modern", "--batch", "2").stdout
    assert "input 2x1x28x28" in out and "6x28x28" in out
    result = lenet("summary", "--model", "classic", "--input-size", "32", "32", check=False)
    assert result.returncode == 2
    assert "--input-size: input 1x32x32 does not fit layer fc1" in result.stderr
    assert result.stderr.count("\n") == 1


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    result = lenet("evaluate", str(tmp_path / "missing.safetensors"), check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.safetensors" in result.stderr


@pytest.mark.real_data
def test_data_train_evaluate_bench_end_to_end(tmp_path, mnist_cache):
    env = {"LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}
    info = json.loads(lenet("data", "info", env=env).stdout)
    assert info["cached"] is True
    fetched = json.loads(lenet("data", "fetch", env=env).stdout)
    assert fetched["source"].startswith("cache")

    run = tmp_path / "run"
    train = lenet(
        "train",
        "--model",
        "modern",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "30",
        "--out",
        str(run),
        env=env,
    )
    assert "test accuracy" in train.stdout and str(run / "best.safetensors") in train.stdout
    assert (run / "metrics.jsonl").exists()

    report = json.loads(lenet("evaluate", str(run / "last.safetensors"), "--json", env=env).stdout)
    assert report["dataset"] == "mnist" and 0.5 < report["accuracy"] <= 1
    assert len(report["confusion"]) == 10 and sum(map(sum, report["confusion"])) == 10_000
    text = lenet("evaluate", str(run / "last.safetensors"), env=env).stdout
    assert "precision" in text and "confusion matrix" in text

    bench = json.loads(lenet("bench", "train", "--quick", "--json", env=env).stdout)
    assert {"baseline_images_per_s", "images_per_s", "speedup", "eval_images_per_s"} <= set(bench)
    assert bench["images_per_s"] > 0 and bench["baseline_images_per_s"] > 0
    if fastcpu.load_extension() is not None:  # lenet5-1998's fused SDLM training beside the plain loop
        assert bench["lenet5_sdlm_batch1_images_per_s"] > 0 and bench["lenet5_sdlm_batch16_speedup"] > 0


BLOCK_EXTRAS = """
import importlib.abc, importlib.machinery, sys
EXTRAS = {"matplotlib", "fastapi", "uvicorn", "starlette", "multipart", "python_multipart", "orjson", "onnx",
          "onnxruntime", "onnxscript", "httptools", "uvloop"}

class Missing(importlib.abc.Loader):  # what importing a package that is not installed does
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        pass

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            return importlib.machinery.ModuleSpec(name, Missing())

sys.meta_path.insert(0, Blocked())
from lenet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.real_data
def test_without_the_extras_every_command_works_or_names_the_extra_in_one_line(tmp_path, mnist_cache):
    env = {**os.environ, "LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}

    def bare(*args):
        return subprocess.run(
            [sys.executable, "-c", BLOCK_EXTRAS, *args], capture_output=True, text=True, env=env
        )

    run, digit = tmp_path / "run", "tests/digits/7_198_drawn-medium-photo-light.jpg"
    trained = bare(
        "train", "--epochs", "1", "--max-steps-per-epoch", "5", "--out", str(run), "--device", "cpu"
    )
    assert trained.returncode == 0, trained.stderr
    assert "plots skipped: they need matplotlib: pip install 'lenet[plot]'" in trained.stderr
    checkpoint = str(run / "best.safetensors")
    (tmp_path / "m.onnx").write_bytes(b"not read: the import fails first")
    works = [("summary",), ("evaluate", checkpoint), ("predict", checkpoint, digit)]
    for args in works:
        done = bare(*args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
    needs = {
        ("explain", checkpoint, digit, "-o", str(tmp_path / "x.png")): "plot",
        ("export", checkpoint, "--format", "onnx"): "onnx",
        ("predict", str(tmp_path / "m.onnx"), digit): "onnx",
        ("serve", checkpoint): "serve",
        ("bench", "serve", "--quick"): "serve",
    }
    for args, extra in needs.items():
        done = bare(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith("lenet: error: ") and f"pip install 'lenet[{extra}]'" in done.stderr, (
            args
        )


@pytest.mark.parametrize(
    "args", [("summary",), ("evaluate", "CHECKPOINT"), ("predict", "CHECKPOINT", "tests/digits", "--json")]
)
def test_a_reader_that_goes_away_stops_the_command_quietly(args, classic_checkpoint, mnist_cache):
    env = {**os.environ, "LENET_DATA_DIR": str(mnist_cache), "LENET_OFFLINE": "1"}
    argv = [str(classic_checkpoint) if a == "CHECKPOINT" else a for a in args]
    process = subprocess.Popen(
        [sys.executable, "-m", "lenet", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    process.stdout.close()  # `lenet ... | true`: the reader is gone before the first line is written
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE  # what the shell reports for `yes | true`
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
