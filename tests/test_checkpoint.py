import json
import struct

import pytest
import torch

from lenet import checkpoint
from lenet.errors import LenetError
from lenet.models import build

META = {
    "model": {"name": "modern", "kwargs": {}},
    "normalization": {"mean": 0.1307, "std": 0.3081},
    "epoch": 3,
    "classes": list("0123456789"),
}


def saved(tmp_path, with_optimizer=False):
    torch.manual_seed(0)
    model = build("modern")
    optimizer = None
    if with_optimizer:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.rand(4, 1, 28, 28)).sum().backward()
        optimizer.step()
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, META, optimizer, {"rng.torch": torch.get_rng_state()})
    return path, model, optimizer


def test_round_trip_is_exact_and_self_describing(tmp_path):
    path, model, optimizer = saved(tmp_path, with_optimizer=True)
    ckpt = checkpoint.load(path)
    assert ckpt.meta["epoch"] == 3 and ckpt.meta["format"] == "lenet-checkpoint"
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], tensor)
    assert torch.equal(ckpt.tensors["rng.torch"], torch.get_rng_state())  # nothing drew numbers since saving
    fresh = torch.optim.AdamW(build("modern").parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt.optimizer_state)
    original = optimizer.state_dict()
    restored = fresh.state_dict()
    assert restored["param_groups"] == json.loads(json.dumps(original["param_groups"]))
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][index][key]), torch.as_tensor(value))


def test_load_model_rebuilds_it_in_eval_mode(tmp_path):
    path, model, _ = saved(tmp_path)
    rebuilt, meta = checkpoint.load_model(path)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    assert meta["model"]["name"] == "modern" and not rebuilt.training


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path, _, _ = saved(tmp_path)
    first = path.read_bytes()
    saved(tmp_path)
    assert path.read_bytes() == first  # same seed, same bytes: saving is deterministic
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _corrupt(tmp_path, data: bytes):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(LenetError) as info:
        checkpoint.load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_corrupt_checkpoints_give_one_line_errors_naming_the_file(tmp_path):
    path, _, _ = saved(tmp_path)
    good = path.read_bytes()
    assert "not a safetensors checkpoint" in _corrupt(tmp_path, b"abc")
    assert "impossible" in _corrupt(tmp_path, struct.pack("<Q", 10**12) + b"{}")
    assert "corrupt safetensors" in _corrupt(tmp_path, good[:-100])
    assert "no readable 'lenet' metadata" in _corrupt(tmp_path, struct.pack("<Q", 2) + b"{}")
    header = json.dumps({"__metadata__": {"lenet": json.dumps({"format": "other"})}}).encode()
    assert "not a lenet checkpoint" in _corrupt(tmp_path, struct.pack("<Q", len(header)) + header)
    assert "cannot read checkpoint" in _corrupt_missing(tmp_path)


def _corrupt_missing(tmp_path):
    with pytest.raises(LenetError) as info:
        checkpoint.load(tmp_path / "nope.safetensors")
    return str(info.value)


def test_a_checkpoint_of_an_unknown_model_is_refused(tmp_path):
    model = build("classic")
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, {"model": {"name": "lenet9", "kwargs": {}}})
    with pytest.raises(LenetError, match="does not describe a buildable model: unknown model 'lenet9'"):
        checkpoint.load_model(path)
    checkpoint.save(path, model, {"model": {"name": "modern", "kwargs": {}}})
    with pytest.raises(LenetError, match="does not describe a buildable model"):
        checkpoint.load_model(path)


def test_loading_never_unpickles(tmp_path):
    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled)  # a pickle-based file under a safetensors name
    with pytest.raises(LenetError):
        checkpoint.load(pickled)
