"""The one exception type for mistakes a user can cause (bad file, bad flag, missing data), and the one
way to import an optional dependency."""

from __future__ import annotations

import importlib
from types import ModuleType


class LenetError(Exception):
    """A user-caused error: the CLI prints its message as one line on stderr and exits with status 2.

    Messages name the file or field and say what was expected. Bugs raise anything else.
    """


# Which extra of pyproject.toml brings each optional package (by its import name).
EXTRAS = {
    "matplotlib": "plot",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "orjson": "serve",
    "httptools": "serve",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
}


def optional(*names: str, purpose: str) -> list[ModuleType]:
    """Import optional packages, or raise one LenetError naming the missing one and the extra to install.

    purpose says what needs them, e.g. "lenet serve": "lenet serve needs uvicorn: pip install 'lenet[serve]'".
    """
    try:
        return [importlib.import_module(name) for name in names]
    except ImportError as e:
        missing = (e.name or names[0]).split(".")[0]
        extra = EXTRAS.get(missing, "all")
        raise LenetError(f"{purpose} needs {missing}: pip install 'lenet[{extra}]'") from None
