"""Checkpoints that describe themselves: one safetensors file, tensors plus a JSON header.

Tensors (model weights, optimizer moments, RNG states) are stored as safetensors; everything else
(model name and arguments, normalisation, dataset, class names, epoch, metrics, optimizer settings)
lives in the file's metadata as JSON under the key "lenet". Loading never unpickles anything.
"""

from __future__ import annotations

import importlib
import inspect
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lenet import atomic
from lenet.errors import LenetError

FORMAT = "lenet-checkpoint"
VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # anything else, e.g. "rng.torch"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    # a learning rate held in a device tensor (for a CUDA graph) is stored as the number it holds
    groups = [
        {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
        for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def save(
    path: str | Path,
    model: nn.Module,
    meta: dict,
    optimizer: torch.optim.Optimizer | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write model weights, optional optimizer state and extra tensors with meta as JSON.

    Raises atomic.WriteError (a LenetError naming path) when the file cannot be written; the old file stays.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    all_tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, **meta}
    if optimizer is not None:
        opt_tensors, meta["optimizer_state"] = _flatten_optimizer(optimizer.state_dict())
        all_tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    for key, value in (tensors or {}).items():
        all_tensors[f"extra.{key}"] = value.detach().cpu().contiguous()
    atomic.write_bytes(path, st_save(all_tensors, metadata={"lenet": json.dumps(meta)}))


def _read_meta(path: Path, data: bytes) -> dict:
    if len(data) < 8:
        raise LenetError(f"{path}: not a safetensors checkpoint (file is {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise LenetError(f"{path}: not a safetensors checkpoint (header length {header_len} is impossible)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["lenet"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise LenetError(f"{path}: not a lenet checkpoint (no readable 'lenet' metadata: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LenetError(f"{path}: not a lenet checkpoint (metadata format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise LenetError(f"{path}: checkpoint version {meta.get('version')!r}, this lenet reads {VERSION}")
    return meta


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint file; raises LenetError naming the file if it is missing or malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LenetError(f"{path}: cannot read checkpoint: {e.strerror}") from None
    meta = _read_meta(path, data)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for every malformed layout
        raise LenetError(f"{path}: corrupt safetensors data: {_first_line(e)}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "extra": {}}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in groups:
            raise LenetError(f"{path}: unexpected tensor {name!r} in checkpoint")
        groups[prefix][rest if prefix != "optimizer" else name] = value
    optimizer_state = None
    if "optimizer_state" in meta:
        try:
            optimizer_state = _unflatten_optimizer(groups["optimizer"], meta.pop("optimizer_state"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LenetError(f"{path}: corrupt optimizer state: {_first_line(e)}") from None
    return Checkpoint(meta, groups["model"], optimizer_state, groups["extra"])


def class_path(cls: type) -> str:
    """ "module:QualName" of a class, what a checkpoint records to rebuild a module of the user's own."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_json_value(value: object) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def known_kwargs(model: nn.Module) -> dict | None:
    """The constructor arguments a module of the user's own was built with, where they can be known.

    A parameter of __init__ counts as known when the module holds a plain (JSON) attribute of that name, as
    `self.hidden = hidden` does, or has a default; None when a required one is unknown.
    """
    try:
        parameters = list(inspect.signature(type(model).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    kwargs = {}
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(model, p.name, inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and _is_json_value(value):
            kwargs[p.name] = list(value) if isinstance(value, tuple) else value
        elif p.default is inspect.Parameter.empty:
            return None
    return kwargs


def model_spec(model: nn.Module, name: str, kwargs: dict | None) -> dict:
    """What a checkpoint says about its model: {"name": a built-in name or "module:QualName", "kwargs":
    constructor arguments, or None where they are unknown}. kwargs None: found by known_kwargs."""
    if ":" in name and kwargs is None:
        kwargs = known_kwargs(model)
    return {"name": name, "kwargs": kwargs}


def _import_class(name: str) -> type:
    """The nn.Module subclass "module:QualName" names; LenetError saying what to import when it fails."""
    module_name, _, qualname = name.partition(":")
    if module_name == "__main__" and not hasattr(sys.modules.get("__main__"), qualname.split(".")[0]):
        raise LenetError(
            f"model class {qualname} was defined in the script or notebook that trained it (__main__): "
            f"move it into a module you can import, or pass it in Python: "
            f"lenet.load(PATH, model={qualname}())"
        )
    try:
        found: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except ImportError as e:
        raise LenetError(
            f"model class {name}: cannot import {module_name} ({e}); put it on PYTHONPATH, or in Python pass "
            f"the model: lenet.load(PATH, model={qualname.split('.')[-1]}())"
        ) from None
    except AttributeError:
        raise LenetError(f"model class {name}: {module_name} has no {qualname}") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise LenetError(f"model class {name}: not an nn.Module class")  # never call anything else
    return found


def build_model(spec: dict) -> nn.Module:
    """The model a checkpoint's meta["model"] describes, freshly initialised."""
    from lenet.models import build

    name, kwargs = spec["name"], spec.get("kwargs", {})
    if ":" not in name:
        return build(name, **kwargs)
    cls = _import_class(name)
    if kwargs is None:
        raise LenetError(
            f"model class {name}: its constructor arguments are unknown; in Python pass the model: "
            f"lenet.load(PATH, model={cls.__name__}(...))"
        )
    return cls(**kwargs)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", model: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the exact model a checkpoint describes, in eval mode, with no other input.

    model: a module of the right architecture to load the weights into instead (for a class of the user's
    own that cannot be imported or rebuilt from its recorded constructor arguments).
    Also checks what every user of the model relies on: finite weights, meta "normalization" (finite mean,
    positive std) and "classes" (one name per output), and "input_shape" and "dataset" where present.
    """
    ckpt = load(path)
    spec = ckpt.meta.get("model", {})
    try:
        if model is None:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise KeyError("name")
            model = build_model(spec)
        model.load_state_dict(ckpt.model_state)
    except LenetError as e:
        raise LenetError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        reason = _first_line(e)
        raise LenetError(f"{path}: checkpoint does not describe a buildable model: {reason}") from None
    _check_usable(path, model.eval(), ckpt.meta)
    return model.to(device), ckpt.meta


def _check_usable(path: Path, model: nn.Module, meta: dict) -> None:
    def refuse(field: str, expected: str, found: object) -> LenetError:
        return LenetError(f"{path}: checkpoint {field!r}: expected {expected}, found {found!r:.80}")

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LenetError(f"{path}: checkpoint weight {name!r} holds NaN or infinite values")
    norm = meta.get("normalization")
    if not (isinstance(norm, dict) and _is_number(norm.get("mean")) and _is_number(norm.get("std"))):
        raise refuse("normalization", "finite mean and std", norm)
    if norm["std"] <= 0:
        raise refuse("normalization", "a positive std", norm["std"])
    if meta.get("input_shape", [1, 28, 28]) != [1, 28, 28]:
        raise refuse("input_shape", "[1, 28, 28]", meta["input_shape"])
    if not isinstance(meta.get("dataset", ""), str):
        raise refuse("dataset", "a name", meta["dataset"])
    with torch.no_grad():
        outputs = model(torch.zeros(1, 1, 28, 28)).shape[-1]
    classes = meta.get("classes")
    names = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    if not names or len(classes) != outputs:
        raise refuse("classes", f"{outputs} names", classes)


def _is_number(value: object) -> bool:
    # comparing, not float(): a JSON integer may be too large for a float; NaN compares false
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1e30 < value < 1e30


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
