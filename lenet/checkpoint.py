"""Checkpoints that describe themselves: one safetensors file, tensors plus a JSON header.

Tensors (model weights, optimizer moments, RNG states) are stored as safetensors; everything else
(model name and arguments, normalisation, dataset, class names, epoch, metrics, optimizer settings)
lives in the file's metadata as JSON under the key "lenet". Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


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
    """Atomically write model weights, optional optimizer state and extra tensors with meta as JSON."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    all_tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, **meta}
    if optimizer is not None:
        opt_tensors, meta["optimizer_state"] = _flatten_optimizer(optimizer.state_dict())
        all_tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    for key, value in (tensors or {}).items():
        all_tensors[f"extra.{key}"] = value.detach().cpu().contiguous()
    atomic_write_bytes(path, st_save(all_tensors, metadata={"lenet": json.dumps(meta)}))


def _read_meta(path: Path, data: bytes) -> dict:
    if len(data) < 8:
        raise LenetError(f"{path}: not a safetensors checkpoint (file is {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise LenetError(f"{path}: not a safetensors checkpoint (header length {header_len} is impossible)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["lenet"])
    except (ValueError, KeyError, TypeError) as e:
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
        raise LenetError(f"{path}: corrupt safetensors data: {e}") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "extra": {}}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in groups:
            raise LenetError(f"{path}: unexpected tensor {name!r} in checkpoint")
        groups[prefix][rest if prefix != "optimizer" else name] = value
    optimizer_state = None
    if "optimizer_state" in meta:
        optimizer_state = _unflatten_optimizer(groups["optimizer"], meta.pop("optimizer_state"))
    return Checkpoint(meta, groups["model"], optimizer_state, groups["extra"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the exact model a checkpoint describes, in eval mode, with no other input."""
    from lenet.models import build

    ckpt = load(path)
    spec = ckpt.meta.get("model", {})
    try:
        model = build(spec["name"], **spec.get("kwargs", {}))
        model.load_state_dict(ckpt.model_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LenetError(f"{path}: checkpoint does not describe a buildable model: {first_line}") from None
    return model.to(device).eval(), ckpt.meta
