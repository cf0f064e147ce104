"""Every training option in one place: its name, default, choices and help.

`TrainConfig` is what `lenet.fit` takes and what `lenet train`'s flags are generated from (cli.py reads these
fields; nothing else spells them out). Fields left as None take the model's recipe from RECIPES, so
`TrainConfig(model="modern")` is modern's recipe and any value given explicitly wins over it.

Torch-free on purpose: `lenet --help` imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from lenet.errors import LenetError

MODELS = ("classic", "modern", "lenet5-1998", "lenet1", "lenet4")
DATASETS = ("mnist", "fashion-mnist")
OPTIMIZERS = ("sgd", "adam", "adamw", "sdlm")
SCHEDULES = ("constant", "step", "cosine", "one-cycle", "lecun1998")
AUGMENTS = ("none", "affine", "elastic")
LOSSES = ("cross-entropy", "map")
DEVICES = ("auto", "cpu", "cuda", "mps")
REPRODUCTIONS = ("lecun1998", "d2l", "improvements")  # `lenet reproduce NAME` (lenet/reproduce.py)

# The paper trained on all 60,000 training images and reports the error after the last pass: no
# validation split.
_PAPER_RECIPE = dict(
    epochs=20, batch_size=16, optimizer="sdlm", lr=5e-4, schedule="lecun1998", weight_decay=0.0, val_split=0
)
# The default recipe of each model: what a bare `lenet train --model NAME` uses. A model without an entry
# (a module of the user's own) gets classic's. How each was chosen: docs/recipes.md.
RECIPES: dict[str, dict[str, Any]] = {
    "classic": dict(
        epochs=10,
        batch_size=256,
        optimizer="adam",
        lr=2e-2,
        momentum=0.9,
        schedule="one-cycle",
        weight_decay=0.0,
        augment="none",
        loss="cross-entropy",
        val_split=5000,
    ),
    # All 60,000 images and the last epoch: on user-style digits the last epoch read better than the one
    # a 5,000-image MNIST split chose (docs/recipes.md), so the split has nothing left to choose.
    "modern": dict(
        epochs=10,
        batch_size=128,
        optimizer="adamw",
        lr=1e-2,
        weight_decay=5e-4,
        augment="affine",
        val_split=0,
    ),
    # The 1998 paper's networks: its training (SDLM, 20 passes, the per-pass eta table from 0.0005 per
    # sample) on batches of 16 (LeNet-1: 8) instead of single samples, and the MAP loss for LeNet-5's RBF
    # output. docs/lenet5-1998.md explains each choice.
    "lenet5-1998": {**_PAPER_RECIPE, "loss": "map"},
    "lenet1": {**_PAPER_RECIPE, "batch_size": 8},
    "lenet4": _PAPER_RECIPE,
}
# On a GPU: larger batches keep it busy (a step costs about the same whatever the batch), with the learning
# rate and epochs that give the CPU recipe's validation accuracy at that batch (docs/recipes.md).
CUDA_RECIPES: dict[str, dict[str, Any]] = {
    "classic": dict(batch_size=1024, lr=3e-2, epochs=15),
    "modern": dict(batch_size=2048, lr=4e-2, epochs=20),
}


def _option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A TrainConfig field. cli=False: not a `lenet train` flag; help=None: a hidden flag."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if default == {}:
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


RECIPE = "(default: the model's recipe)"


@dataclass
class TrainConfig:
    """A training run. None means "the model's recipe" for the fields RECIPES sets."""

    model: str = _option(
        "classic", f"a model name ({', '.join(MODELS)}) or module:Class of your own nn.Module"
    )
    model_kwargs: dict = _option({}, "the model's constructor arguments as JSON, e.g. '{\"dropout\": 0.5}'")
    dataset: str = _option("mnist", "the dataset to train and test on", choices=DATASETS)
    data_dir: str | None = _option(None, "a folder holding the four IDX files (raw or .gz)")
    epochs: int | None = _option(None, f"passes over the training set {RECIPE}")
    batch_size: int | None = _option(None, f"global batch size, split across torchrun processes {RECIPE}")
    optimizer: str | None = _option(None, f"the optimizer {RECIPE}", choices=OPTIMIZERS)
    lr: float | None = _option(None, f"peak learning rate (sdlm: the paper's per-sample eta) {RECIPE}")
    momentum: float | None = _option(None, "sgd only (default 0.9; 0 for plain SGD)")
    schedule: str | None = _option(None, f"learning-rate schedule {RECIPE}", choices=SCHEDULES)
    weight_decay: float | None = _option(None, f"decoupled for adamw, L2 otherwise {RECIPE}")
    augment: str | None = _option(None, f"random distortions per batch {RECIPE}", choices=AUGMENTS)
    loss: str | None = _option(None, f"map: the 1998 paper's, for lenet5-1998 {RECIPE}", choices=LOSSES)
    val_split: int | None = _option(
        None, f"last training images held out to choose the best epoch (0: none, keep the last) {RECIPE}"
    )
    seed: int = _option(0, "seed of weights, data order, dropout and distortions")
    device: str = _option("auto", "where to train", choices=DEVICES)
    out: str | None = _option(None, "run folder (default runs/MODEL, or a fresh runs/MODEL-N if taken)")
    resume: bool = _option(False, "continue from the run folder's last checkpoint")
    overwrite: bool = _option(False, "replace the run the folder holds")
    compile: bool = _option(False, "torch.compile the model (slow start, faster steps)")
    sync_batchnorm: bool = _option(False, "under torchrun on CUDA: batch norm over all processes")
    max_steps_per_epoch: int | None = _option(None, None)  # smoke tests and benchmarks: cut epochs short

    def __post_init__(self) -> None:
        base = self.model if self.model in RECIPES else "classic"  # a module of the user's own: classic's
        recipe = {
            **RECIPES["classic"],
            **RECIPES[base],
            **(CUDA_RECIPES.get(base, {}) if self._on_cuda() else {}),
        }
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.check()

    def _on_cuda(self) -> bool:
        if self.device == "auto":
            from lenet.device import resolve_device  # torch: only once a run is being configured

            return resolve_device("auto").type == "cuda"
        return self.device == "cuda"

    def check(self) -> None:
        """One-line LenetError for a value outside its choices or range."""
        if self.model not in MODELS and ":" not in self.model:
            raise LenetError(
                f"--model: unknown {self.model!r}, expected one of {', '.join(MODELS)} or module:Class"
            )
        for f in dataclasses.fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                flag = "--" + f.name.replace("_", "-")
                raise LenetError(f"{flag}: unknown {value!r}, expected one of {', '.join(choices)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LenetError("--epochs, --batch-size and --lr must be positive")
        if self.resume and self.overwrite:
            raise LenetError("--resume and --overwrite: choose one")


def flag_fields() -> list[dataclasses.Field]:
    """The fields that are `lenet train` flags, in order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_line(cfg: TrainConfig, fields: list[str]) -> str:
    """`lenet train --model M --FIELD VALUE ...` for the named fields, e.g. to repeat a run."""
    parts = ["lenet train", f"--model {cfg.model}"]
    for name in fields:
        value = getattr(cfg, name)
        if isinstance(value, bool):
            parts += [flag(name)] if value else []
        elif isinstance(value, dict):
            parts += [f"{flag(name)} {shlex.quote(json.dumps(value))}"] if value else []
        elif value is not None:
            parts.append(f"{flag(name)} {value}")
    return " ".join(parts)
