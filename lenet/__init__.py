"""lenet: LeNet-5 (LeCun et al., 1998) as a library and a command.

    import lenet
    net = lenet.build("classic")            # or any nn.Module of your own
    lenet.summary(net)                      # output shapes and parameters of every layer
    run = lenet.fit(net, epochs=3)          # run.model, run.history, run.checkpoint
    clf = lenet.load(run.checkpoint)        # clf.predict("digit.png"), clf.evaluate(), clf.explain(...)
    ds = lenet.datasets.load("mnist")       # the verified in-memory dataset

Importing lenet is cheap: torch and the rest load when a name below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); None: the module itself
_API = {
    "build": ("lenet.models", "build"),
    "summary": ("lenet.models", "summary"),
    "fit": ("lenet.train", "fit"),
    "Run": ("lenet.train", "Run"),
    "TrainConfig": ("lenet.config", "TrainConfig"),
    "RECIPES": ("lenet.config", "RECIPES"),
    "load": ("lenet.classifier", "load"),
    "Classifier": ("lenet.classifier", "Classifier"),
    "datasets": ("lenet.data", None),
    "LenetError": ("lenet.errors", "LenetError"),
}
__all__ = ["RECIPES", "Classifier", "LenetError", "Run", "TrainConfig", "build", "datasets", "fit", "load"]
__all__ += ["summary"]

if TYPE_CHECKING:  # for editors and type checkers; at run time __getattr__ imports on first use
    from lenet import data as datasets
    from lenet.classifier import Classifier, load
    from lenet.config import RECIPES, TrainConfig
    from lenet.errors import LenetError
    from lenet.models import build, summary
    from lenet.train import Run, fit


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lenet' has no attribute {name!r}")
    module_name, attribute = _API[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
