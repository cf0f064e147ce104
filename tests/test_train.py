import json
import math

import pytest
import torch

from lenet import checkpoint
from lenet.config import RECIPES, SCHEDULES, TrainConfig
from lenet.errors import LenetError
from lenet.train import fit, learning_rate


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        model="classic",
        epochs=2,
        batch_size=16,
        lr=0.01,
        out=str(tmp_path / "run"),
        device="cpu",
        val_split=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_a_few_epochs_lower_the_loss_and_write_the_run_folder(tmp_path, tiny_dataset):
    result = fit(tiny_config(tmp_path, epochs=4), log=lambda _: None, dataset=tiny_dataset)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {
        "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
        "images_per_s",
    }  # fmt: skip
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.5  # ten easy classes: chance is 0.1
    assert json.loads((run / "config.json").read_text())["model"] == "classic"
    assert (run / "best.safetensors").exists() and result.last == run / "last.safetensors"


def test_checkpoint_alone_rebuilds_the_exact_model(tmp_path, tiny_dataset):
    fit(tiny_config(tmp_path, model="modern", epochs=1), log=lambda _: None, dataset=tiny_dataset)
    model, meta = checkpoint.load_model(tmp_path / "run" / "last.safetensors")
    assert meta["model"] == {"name": "modern", "kwargs": {}}
    assert meta["epoch"] == 1 and meta["classes"] == list("0123456789")
    assert set(meta["normalization"]) == {"mean", "std"}
    ckpt = checkpoint.load(tmp_path / "run" / "last.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt.model_state[name]), name
    assert not model.training


class Killed(Exception):
    pass


def kill_after_epoch(epoch: int):
    """A log function that stops fit() right after it reports the given epoch (its checkpoint is written)."""

    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch}:"):
            raise Killed

    return log


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_dataset):
    # modern uses dropout and batch norm: resume must restore the RNG and optimizer state exactly.
    full = tiny_config(tmp_path / "a", model="modern", epochs=3)
    fit(full, log=lambda _: None, dataset=tiny_dataset)
    killed = tiny_config(tmp_path / "b", model="modern", epochs=3)
    with pytest.raises(Killed):
        fit(killed, log=kill_after_epoch(1), dataset=tiny_dataset)
    resumed = tiny_config(tmp_path / "b", model="modern", epochs=3, resume=True)
    fit(resumed, log=lambda _: None, dataset=tiny_dataset)
    a = checkpoint.load(tmp_path / "a" / "run" / "last.safetensors")
    b = checkpoint.load(tmp_path / "b" / "run" / "last.safetensors")
    assert a.model_state.keys() == b.model_state.keys()
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), name
    lines_a = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()

    def strip(lines):
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("seconds", "images_per_s")} for x in lines
        ]

    assert strip(lines_a) == strip(lines_b)


def test_resume_drops_metric_lines_of_epochs_lost_to_a_kill(tmp_path, tiny_dataset):
    fit(tiny_config(tmp_path, epochs=1), log=lambda _: None, dataset=tiny_dataset)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(
        metrics.read_text() + '{"epoch": 2, "train_loss": 0.1}\n{"epo'
    )  # lost epoch, torn line
    fit(tiny_config(tmp_path, epochs=2, resume=True), log=lambda _: None, dataset=tiny_dataset)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_resuming_a_finished_run_trains_nothing_and_reports_its_accuracy(tmp_path, tiny_dataset):
    first = fit(tiny_config(tmp_path, epochs=2), log=lambda _: None, dataset=tiny_dataset)
    last = tmp_path / "run" / "last.safetensors"
    before = last.read_bytes()
    lines: list[str] = []
    again = fit(tiny_config(tmp_path, epochs=2, resume=True), log=lines.append, dataset=tiny_dataset)
    assert again.test_acc == first.test_acc and again.chosen_epoch == first.chosen_epoch == 2
    assert again.history == first.history
    assert any("nothing left to train" in line for line in lines)
    assert last.read_bytes() == before


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset):
    fit(tiny_config(tmp_path, epochs=1), log=lambda _: None, dataset=tiny_dataset)
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    bad = tiny_config(tmp_path, epochs=2, resume=True, lr=1e38, schedule="constant")
    with pytest.raises(LenetError, match=r"diverged in epoch 2: loss is nan.*last good checkpoint"):
        fit(bad, log=lambda _: None, dataset=tiny_dataset)
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_model_or_optimizer(tmp_path, tiny_dataset):
    fit(tiny_config(tmp_path, epochs=1), log=lambda _: None, dataset=tiny_dataset)
    with pytest.raises(LenetError, match="holds model"):
        fit(tiny_config(tmp_path, model="modern", resume=True), log=lambda _: None, dataset=tiny_dataset)
    with pytest.raises(LenetError, match="trained with --optimizer adam, cannot resume with sgd"):
        fit(tiny_config(tmp_path, optimizer="sgd", resume=True), log=lambda _: None, dataset=tiny_dataset)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_start_near_peak_or_warm_up_and_end_low(schedule):
    cfg = TrainConfig(lr=0.1, schedule=schedule)
    lrs = [learning_rate(cfg, step, 1000) for step in range(1000)]
    assert max(lrs) == pytest.approx(0.1, rel=0.02)
    assert all(lr > 0 or math.isclose(lr, 0, abs_tol=1e-6) for lr in lrs)
    if schedule != "constant":
        assert lrs[-1] < 0.02


def test_recipes_are_valid_configs():
    for model in RECIPES:
        cfg = TrainConfig(model=model, epochs=None, lr=0.5)
        assert cfg.model == model and cfg.lr == 0.5 and cfg.epochs == RECIPES[model]["epochs"]


@pytest.mark.real_data
def test_real_mnist_short_training_clears_an_accuracy_floor(tmp_path, mnist_cache):
    cfg = TrainConfig(
        model="modern", epochs=1, data_dir=str(mnist_cache / "mnist"), out=str(tmp_path / "run"), device="cpu"
    )
    result = fit(cfg, log=lambda _: None)
    assert result.test_acc >= 0.97
