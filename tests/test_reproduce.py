import json
import shlex

import pytest

from lenet import cli, reproduce
from lenet.errors import LenetError


def table_rows(text: str) -> dict[str, list[str]]:
    """First table of a Markdown report: network label -> its cells."""
    rows = {}
    for line in text.split("## Runs")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("network", "change", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_d2l_smoke_writes_the_report_beside_the_books_number(tmp_path, tiny_dataset):
    out = reproduce.run("d2l", smoke=True, runs_dir=tmp_path / "runs", device="cpu", log=lambda _: None,
                        dataset=tiny_dataset)  # fmt: skip
    assert out == tmp_path / "runs" / "reproduce-d2l-smoke.md"
    text = out.read_text()
    assert "Smoke run" in text and "torch" in text and "cores" in text
    rows = table_rows(text)
    assert list(rows) == ["d2l LeNet (classic, SGD 0.9)", "modern, our default recipe"]
    assert rows["d2l LeNet (classic, SGD 0.9)"][0] == "0.779"
    assert rows["modern, our default recipe"][4] == ">= 0.91"
    config = json.loads((tmp_path / "runs" / "d2l-classic-seed0" / "config.json").read_text())
    assert (config["optimizer"], config["lr"], config["batch_size"], config["momentum"]) == (
        "sgd",
        0.9,
        256,
        0.0,
    )
    assert config["dataset"] == "fashion-mnist"
    command = next(line for line in text.splitlines() if "d2l-classic-seed0`" in line).split("`")[1]
    assert command.startswith("lenet train --model classic --dataset fashion-mnist --epochs 1")
    args = cli.build_parser().parse_args(command.split()[1:])  # the printed command parses and means it
    assert (args.optimizer, args.lr, args.momentum, args.batch_size) == ("sgd", 0.9, 0.0, 256)


@pytest.mark.real_data
def test_lecun1998_smoke_from_the_command_line(tmp_path, mnist_cache, monkeypatch, capsys):
    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    out = tmp_path / "report.md"
    argv = ["reproduce", "lecun1998", "--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    assert f"report {out}" in capsys.readouterr().out
    rows = table_rows(out.read_text())
    assert [(label, cells[0]) for label, cells in rows.items()] == [
        ("LeNet-1", "1.70"), ("LeNet-4", "1.10"), ("LeNet-5", "0.95"), ("LeNet-5, distortions", "0.80"),
    ]  # fmt: skip
    assert all(cells[2] == "1" for cells in rows.values())  # one run each
    assert "--augment affine" in out.read_text()


def test_report_says_what_ran_and_what_did_not():
    runs = [{"test_acc": 0.99, "epoch": 7, "epochs": 20, "wall_s": 60.0, "seed": 0, "command": "lenet train"}]
    meta = {"command": "lenet reproduce", "date": "today", "machine": "m", "seeds": [0, 1], "smoke": False}
    rows = table_rows(reproduce.report("lecun1998", {"lenet1": runs}, meta))
    assert rows["LeNet-1"] == ["1.70", "1.00", "1", "7 of 20", "within 0.3 points", "unfinished"]
    assert rows["LeNet-4"][1:3] == ["not run", "0"]
    two = [{**runs[0], "epoch": 20, "test_acc": acc} for acc in (0.991, 0.989)]
    rows = table_rows(reproduce.report("lecun1998", {"lenet5": two}, meta))
    assert rows["LeNet-5"] == ["0.95", "1.00 ± 0.14", "2", "20", "<= 0.95%", "no"]


def test_a_run_folder_from_another_configuration_is_not_reported(tmp_path, tiny_dataset):
    reproduce.run("d2l", smoke=True, runs_dir=tmp_path, only=("modern",), device="cpu", log=lambda _: None,
                  dataset=tiny_dataset)  # fmt: skip
    [(_, [cfg])] = [
        (row, cfgs) for row, cfgs in reproduce.configs("d2l", 1, True, tmp_path) if row.key == "modern"
    ]
    assert reproduce._finished_part(cfg)["epoch"] == 1
    cfg.lr *= 2
    assert reproduce._finished_part(cfg) is None


def test_improvements_smoke_writes_every_row_its_figure_and_commands_that_parse(tmp_path, tiny_dataset):
    runs = tmp_path / "runs"
    out = reproduce.run(
        "improvements", smoke=True, runs_dir=runs, device="cpu", log=print, dataset=tiny_dataset
    )
    assert out == tmp_path / "runs" / "improvements-smoke.md"
    text = out.read_text()
    rows = table_rows(text)
    assert list(rows) == [row.label for row in reproduce.IMPROVEMENTS]
    assert rows["classic, the tutorial's settings"][-1] == "fused" and rows["+ ReLU"][-1] == "plain"
    assert all(cells[1] == "1" for cells in rows.values())  # one run each
    assert (tmp_path / "runs" / "improvements-smoke.png").stat().st_size > 10_000
    config = json.loads((tmp_path / "runs" / "relu-seed0" / "config.json").read_text())
    assert config["model_kwargs"] == {"activation": "relu"} and (config["optimizer"], config["lr"]) == (
        "adam",
        1e-3,
    )
    command = next(line for line in text.splitlines() if "relu-seed0`" in line).split("`")[1]
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert args.model_kwargs == {"activation": "relu"} and args.batch_size == 256

    # the reading written by hand below the tables survives the report being written again
    reading = f"{reproduce.KEPT}\n## What the numbers show\n\nReLU helps.\n"
    out.write_text(text.replace("## Runs", "## Runs (old)") + "\n" + reading)
    reproduce.run("improvements", smoke=True, runs_dir=runs, device="cpu", log=print, dataset=tiny_dataset,
                  resume=True)  # fmt: skip
    again = out.read_text()
    assert again.endswith(reading) and again.count(reproduce.KEPT) == 1 and "## Runs (old)" not in again


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(LenetError, match="unknown reproduction 'lenet9'"):
        reproduce.run("lenet9", runs_dir=tmp_path)
    with pytest.raises(
        LenetError, match="--only: expected keys among lenet1, lenet4, lenet5, lenet5-distorted"
    ):
        reproduce.run("lecun1998", only=("lenet7",), runs_dir=tmp_path)
