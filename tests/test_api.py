"""The Python API a learner uses: lenet.build, summary, fit, load, datasets, with modules of their own."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lenet
from lenet import runfolder, steps
from lenet.errors import LenetError

HERE = Path(__file__).parent


# The tutorial's class exactly as a reader types it: x.view, one nn.Sigmoid shared by four layers, no
# nn.Sequential, PyTorch's default initialisation.
class LeNet(nn.Module):
    def __init__(self):
        super(LeNet, self).__init__()  # noqa: UP008 (as the tutorial writes it)
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.sigmoid = nn.Sigmoid()
        self.pool1 = nn.AvgPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool2 = nn.AvgPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool1(self.sigmoid(self.conv1(x)))
        x = self.pool2(self.sigmoid(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = self.sigmoid(self.fc1(x))
        x = self.sigmoid(self.fc2(x))
        x = self.fc3(x)
        return x


class Wide(nn.Module):
    """A module with a constructor argument it keeps as an attribute, and an output size that can be wrong."""

    def __init__(self, hidden: int, classes: int = 10):
        super().__init__()
        self.hidden, self.classes = hidden, classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.body(x)


def quiet(_line: str) -> None:
    pass


def test_import_is_cheap_and_names_load_on_first_use():
    code = "import sys, lenet; print('torch' in sys.modules); lenet.fit; print('lenet.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    assert set(lenet.__all__) <= set(dir(lenet))
    with pytest.raises(AttributeError):
        lenet.no_such_name  # noqa: B018


def test_summary_of_the_tutorial_class_uses_what_forward_calls():
    table = lenet.summary(LeNet())
    assert [name for name, *_ in table.rows].count("sigmoid") == 4  # one module, four calls
    assert [shape for _, _, shape, _ in table.rows] == [
        (6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 10, 10), (16, 5, 5),
        (120,), (120,), (84,), (84,), (10,),
    ]  # fmt: skip
    assert table.parameters == 61_706 and sum(p for *_, p in table.rows) == 61_706
    text = str(table)
    assert "conv1" in text and "16x5x5" in text and text.splitlines()[-1].split() == ["total", "61,706"]
    assert str(lenet.summary(lenet.build("classic"))).splitlines()[-1].split() == ["total", "61,706"]


def test_summary_takes_any_input_size_and_says_which_layer_does_not_fit():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    assert lenet.summary(net, (64, 48), batch=3).rows[0][2] == (4, 62, 46)
    assert lenet.summary(net, (64, 48), batch=3).input_shape == (3, 1, 64, 48)
    with pytest.raises(ValueError, match="input 1x32x32 does not fit layer fc1"):
        lenet.summary(lenet.build("classic"), (32, 32))


def test_a_config_takes_its_models_recipe_and_explicit_values_win():
    modern = lenet.TrainConfig(model="modern")
    assert (modern.optimizer, modern.augment, modern.weight_decay) == ("adamw", "affine", 5e-4)
    assert lenet.TrainConfig(model="modern", augment="none", lr=1e-3).augment == "none"
    assert lenet.TrainConfig(model="lenet5-1998").loss == "map"
    assert lenet.TrainConfig(model="mine:Net").optimizer == lenet.RECIPES["classic"]["optimizer"]
    on_gpu = lenet.TrainConfig(model="modern", device="cuda")  # larger batches keep a GPU busy
    assert (on_gpu.batch_size, on_gpu.augment) == (
        lenet.config.CUDA_RECIPES["modern"]["batch_size"],
        "affine",
    )
    assert lenet.TrainConfig(model="modern", device="cuda", batch_size=64).batch_size == 64
    assert lenet.TrainConfig(model="modern", device="cpu").batch_size == lenet.RECIPES["modern"]["batch_size"]
    with pytest.raises(LenetError, match="--optimizer: unknown 'adagrad', expected one of sgd, adam"):
        lenet.TrainConfig(optimizer="adagrad")
    with pytest.raises(LenetError, match="--model: unknown 'lenet9'"):
        lenet.TrainConfig(model="lenet9")


@pytest.mark.parametrize(
    "model, message",
    [
        (Wide(32, classes=7), r"expected outputs \(N, 10\) for inputs \(N, 1, 28, 28\), got \(N, 7\)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), r"fails on inputs of shape \(N, 1, 28, 28\): mat1"),
    ],
)
def test_a_module_of_the_wrong_shape_is_refused_before_training(tmp_path, tiny_dataset, model, message):
    with pytest.raises(LenetError, match=message):
        lenet.fit(model, out=str(tmp_path / "run"), dataset=tiny_dataset, log=quiet)
    assert not (tmp_path / "run").exists()  # refused before any folder was made


def tiny_fit(tmp_path, model="classic", **options):
    defaults = dict(epochs=2, batch_size=32, lr=0.01, device="cpu", val_split=64, log=quiet)
    return lenet.fit(model, **{**defaults, **options})


def test_fit_returns_the_model_its_history_and_the_chosen_checkpoint(tmp_path, tiny_dataset):
    run = tiny_fit(tmp_path, LeNet(), epochs=3, lr=0.05, out=str(tmp_path / "run"), dataset=tiny_dataset)
    assert isinstance(run.model, LeNet) and len(run.history) == 3
    assert [row["epoch"] for row in run.history] == [1, 2, 3]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert run.history == [json.loads(line) for line in lines]
    best = max(run.history, key=lambda row: row["val_acc"])  # chosen on validation, never on test
    assert run.chosen_epoch == best["epoch"] and run.test_acc == best["test_acc"]
    assert run.checkpoint == tmp_path / "run" / "best.safetensors"
    ckpt = lenet.load(run.checkpoint, model=LeNet())
    for name, tensor in run.model.state_dict().items():  # the returned module holds the chosen weights
        assert torch.equal(tensor, ckpt.model.state_dict()[name]), name
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["model"] == "test_api:LeNet" and meta["val_split"] == 64


def test_a_users_module_is_rebuilt_from_its_class_and_arguments(tmp_path, tiny_dataset):
    run = tiny_fit(tmp_path, Wide(48), epochs=1, out=str(tmp_path / "run"), dataset=tiny_dataset)
    clf = lenet.load(run.checkpoint)  # no model given: rebuilt from test_api:Wide(hidden=48, classes=10)
    assert isinstance(clf.model, Wide) and clf.model.hidden == 48
    assert clf.meta["model"] == {"name": "test_api:Wide", "kwargs": {"hidden": 48, "classes": 10}}


def test_a_class_that_cannot_be_imported_is_named_in_one_line(tmp_path, tiny_dataset):
    run = tiny_fit(tmp_path, LeNet(), epochs=1, out=str(tmp_path / "run"), dataset=tiny_dataset)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    done = subprocess.run(
        [sys.executable, "-m", "lenet", "evaluate", str(run.checkpoint)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "cannot import test_api" in done.stderr and "lenet.load(PATH, model=LeNet())" in done.stderr


def test_a_second_run_never_overwrites_the_first(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    first = tiny_fit(tmp_path, epochs=1, dataset=tiny_dataset)
    second = tiny_fit(tmp_path, epochs=1, dataset=tiny_dataset, log=lines.append)
    assert first.folder == Path("runs/classic") and second.folder == Path("runs/classic-2")
    assert any("runs/classic holds a run: this one goes to runs/classic-2" in line for line in lines)
    before = (tmp_path / "runs/classic/last.safetensors").read_bytes()
    with pytest.raises(
        LenetError, match="runs/classic: holds a run already .* --resume continues it, --overwrite"
    ):
        tiny_fit(tmp_path, epochs=1, dataset=tiny_dataset, out="runs/classic")
    assert (tmp_path / "runs/classic/last.safetensors").read_bytes() == before
    again = tiny_fit(tmp_path, epochs=1, dataset=tiny_dataset, out="runs/classic", overwrite=True, seed=5)
    assert again.folder == Path("runs/classic")
    assert (tmp_path / "runs/classic/last.safetensors").read_bytes() != before


HOLD = """
import sys, time
from lenet import runfolder
held = runfolder.claim(sys.argv[1], None, False, False, print)
print("held", flush=True)
time.sleep(120)
"""


def test_a_folder_in_use_is_refused_naming_the_process_and_freed_when_it_dies(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run(
            [sys.executable, "-m", "lenet", "train", "--out", str(folder), "--device", "cpu"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert f"{folder}: in use by a training run (process {holder.pid})" in done.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claimed = runfolder.claim(folder, None, False, False, quiet)  # a killed holder leaves nothing stuck
    assert claimed.path == folder
    claimed.release()


def test_ctrl_c_keeps_the_last_finished_epoch_and_returns_what_it_has(tmp_path, tiny_dataset, monkeypatch):
    real_step, calls = steps.train_step, []
    per_epoch = (640 - 64) // 32

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", interrupted_in_epoch_2)
    lines: list[str] = []
    run = tiny_fit(tmp_path, epochs=3, out=str(tmp_path / "run"), dataset=tiny_dataset, log=lines.append)
    assert run.interrupted and [row["epoch"] for row in run.history] == [1]
    assert lenet.load(run.last).meta["epoch"] == 1 and run.checkpoint.exists()
    assert any(line.startswith("interrupted in epoch 2") and "holds epoch 1" in line for line in lines)
    monkeypatch.setattr(steps, "train_step", real_step)
    resumed = tiny_fit(tmp_path, epochs=3, out=str(tmp_path / "run"), dataset=tiny_dataset, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3] and not resumed.interrupted


def test_on_epoch_sees_every_row_and_can_stop_the_run(tmp_path, tiny_dataset):
    seen: list[dict] = []

    def stop_after_two(row: dict) -> bool:
        seen.append(row)
        return row["epoch"] < 2

    run = tiny_fit(
        tmp_path, epochs=5, out=str(tmp_path / "run"), dataset=tiny_dataset, on_epoch=stop_after_two
    )
    assert [row["epoch"] for row in seen] == [1, 2] and seen == run.history and not run.interrupted


def test_the_classifier_takes_paths_images_arrays_and_tensors(modern_checkpoint, tmp_path):
    clf = lenet.load(modern_checkpoint)
    ds = lenet.datasets.load("mnist")
    image = ds.test_images[0].numpy()  # (28, 28) uint8, MNIST-style: used as it is
    one = clf.predict(image)
    assert one.label == str(int(ds.test_labels[0])) and abs(sum(one.probabilities) - 1) < 1e-5
    assert np.array_equal(one.input, image)
    path = tmp_path / "digit.png"
    Image.fromarray(255 - np.kron(image, np.ones((4, 4), np.uint8))).save(path)  # a large dark-on-light scan
    assert clf.predict(path).label == one.label == clf.predict(Image.open(path)).label
    assert [p.label for p in clf.predict([path, str(path)])] == [one.label] * 2
    batch = clf.predict(ds.test_images[:64])  # (N, 28, 28) uint8 tensor
    assert (
        len(batch) == 64
        and sum(p.label == str(int(y)) for p, y in zip(batch, ds.test_labels[:64], strict=True)) >= 60
    )
    floats = ds.test_images[:8].float().div(255).unsqueeze(1)  # (N, 1, 28, 28) in 0..1, as ToTensor gives
    assert [p.label for p in clf.predict(floats)] == [p.label for p in batch[:8]]
    assert clf.probabilities(ds.test_images[:5]).shape == (5, 10)
    with pytest.raises(LenetError, match=r"images: expected .* got shape \(2, 3, 28, 28\)"):
        clf.predict(np.zeros((2, 3, 28, 28), np.uint8))


def test_the_classifier_evaluates_and_explains(modern_checkpoint, tmp_path):
    clf = lenet.load(modern_checkpoint)
    report = clf.evaluate()
    assert report.accuracy == pytest.approx(clf.meta["metrics"]["test_acc"], abs=1e-6)
    assert len(report.per_class) == 10 and sum(map(sum, report.confusion)) == 10_000
    assert "precision" in repr(report)
    explanation = clf.explain(lenet.datasets.load("mnist").test_images[0], out=tmp_path / "x.png")
    assert (
        explanation._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "x.png").stat().st_size > 50_000
    )


def test_the_classifier_reads_a_whole_number(modern_checkpoint):
    clf = lenet.load(modern_checkpoint)
    ds = lenet.datasets.load("mnist")
    digits = [ds.test_images[i].numpy() for i in range(3)]  # 7, 2, 1
    gap = np.zeros((28, 12), np.uint8)
    line = np.hstack([gap, digits[0], gap, digits[1], gap, digits[2], gap])
    line = np.vstack([np.zeros((10, line.shape[1]), np.uint8), line, np.zeros((10, line.shape[1]), np.uint8)])
    result = clf.read(255 - line)  # dark ink on light paper, as written
    assert result["number"] == "".join(str(int(y)) for y in ds.test_labels[:3])
    assert [d["box"][0] for d in result["digits"]] == sorted(d["box"][0] for d in result["digits"])


@pytest.mark.real_data
@pytest.mark.slow
def test_the_tutorials_class_trains_to_the_classic_floor_and_round_trips(tmp_path, mnist_cache):
    run = lenet.fit(
        LeNet(), data_dir=str(mnist_cache / "mnist"), out=str(tmp_path / "run"), device="cpu", log=quiet
    )
    assert run.config.epochs == lenet.RECIPES["classic"]["epochs"]  # the classic recipe, untouched
    assert run.test_acc >= 0.988, run.history
    clf = lenet.load(run.checkpoint)
    assert isinstance(clf.model, LeNet) and clf.evaluate().accuracy == pytest.approx(run.test_acc, abs=1e-6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env["LENET_DATA_DIR"] = str(mnist_cache)
    done = subprocess.run(
        [sys.executable, "-m", "lenet", "evaluate", str(run.checkpoint), "--json"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout)["accuracy"] == pytest.approx(run.test_acc, abs=1e-6)


NOTEBOOK_CELLS = [
    "import lenet\nnet = lenet.build('modern')\nlenet.summary(net)",
    "run = lenet.fit(net, epochs=1, max_steps_per_epoch=80, out={out!r}, device='cpu', data_dir={data!r})\n"
    "run",
    "clf = lenet.load(run.checkpoint)\nclf.predict(lenet.datasets.load('mnist', {data!r}).test_images[0])",
    "clf.explain(lenet.datasets.load('mnist', {data!r}).test_images[0])",
]


@pytest.mark.real_data
def test_the_api_works_in_jupyter_with_a_progress_bar(tmp_path, mnist_cache):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    fill = {"out": str(tmp_path / "run"), "data": str(mnist_cache / "mnist")}
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c.format(**fill)) for c in NOTEBOOK_CELLS]
    )
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute(cwd=str(HERE.parent))
    outputs = [cell.outputs for cell in notebook.cells]
    assert "total" in outputs[0][0]["data"]["text/plain"] and "61,932" in outputs[0][0]["data"]["text/plain"]
    fit_streams = "".join(o.get("text", "") for o in outputs[1] if o["output_type"] == "stream")
    assert "epoch 1/1" in fit_streams  # the bar, which a notebook's stderr is no terminal for
    assert outputs[1][-1]["data"]["text/plain"].startswith("Run(modern, 1 epochs")
    assert "Prediction(label='7'" in outputs[2][-1]["data"]["text/plain"]
    assert "image/png" in outputs[3][-1]["data"]
    assert time.perf_counter() - started < 600


def test_no_progress_bar_in_pipes_and_logs(tmp_path, tiny_dataset, capsys):
    tiny_fit(tmp_path, epochs=1, out=str(tmp_path / "run"), dataset=tiny_dataset, log=print)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err


def test_lenet_train_flags_reach_the_config(tmp_path):
    code = textwrap.dedent("""
        import sys
        from lenet import cli, train
        seen = {}
        train.fit = lambda model, **options: seen.update(model=model, **options) or sys.exit(0)
        sys.argv = ["lenet", "train", "--model", "modern", "--epochs", "3", "--val-split", "0", "--overwrite"]
        try:
            cli.main(sys.argv[1:])
        except SystemExit:
            pass
        print(sorted((k, v) for k, v in seen.items() if k != "log"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[('epochs', 3), ('model', 'modern'), ('overwrite', True), ('val_split', 0)]"
