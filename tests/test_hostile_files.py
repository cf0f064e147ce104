"""Hostile data files: fuzzed IDX files and checkpoints give one-line LenetErrors, never another exception,
a hang or memory that follows what a header claims instead of what the file holds."""

import functools
import gzip
import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from lenet import checkpoint, data
from lenet.data import DataError, DatasetSpec, FileSpec, read_idx
from lenet.errors import LenetError
from lenet.models import build

# derandomize: CI sees the same cases on every run; deadline None: this machine's speed varies
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

IDX_CODES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def refused(call, names: str, tally: bool = True):
    """call()'s result, or None where it raised a one-line LenetError naming `names`; anything else fails.

    tally: count the outcome in hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    try:
        result = call()
    except LenetError as e:
        message = str(e)
        assert "\n" not in message and names in message, message
        if tally:
            event("refused: " + message.removeprefix(names).lstrip(": ").split(" (")[0].split(":")[0])
        return None
    if tally:
        event("accepted")
    return result


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="lenet-hostile-") as name:
        yield Path(name)


# ---- IDX files --------------------------------------------------------------------------------------------


@st.composite
def idx_files(draw) -> tuple[bytes, np.ndarray | None]:
    """(file content, the array it holds or None where it is malformed): a header with any dtype code, any
    number of dims and any dims, then a payload of any length, gzipped or not."""
    code = draw(st.sampled_from([*IDX_CODES, draw(st.integers(0, 255))]))
    ndim = draw(st.integers(0, 5))
    small = st.integers(0, 6)
    dims = draw(st.lists(st.one_of(small, small, st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    itemsize = np.dtype(IDX_CODES.get(code, "u1")).itemsize
    expected = math.prod(dims) * itemsize
    length = draw(st.one_of(st.just(expected), st.integers(0, 3000))) if expected <= 3000 else expected % 7
    payload = draw(st.binary(min_size=length, max_size=length))
    magic = draw(st.sampled_from([b"\0\0", b"\0\0", b"\0\1", b"\x1f\x8b"]))
    content = magic + bytes([code, ndim]) + struct.pack(f">{ndim}I", *dims) + payload
    well_formed = magic == b"\0\0" and code in IDX_CODES and ndim > 0 and length == expected
    array = np.frombuffer(payload, IDX_CODES[code]).reshape(dims) if well_formed else None
    if draw(st.booleans()):
        content = gzip.compress(content, mtime=0)
        cut = draw(st.sampled_from([None, None, None, len(content) - 8, draw(st.integers(0, len(content)))]))
        if cut is not None:
            content, array = content[:cut], None
    return content, array


@FUZZ
@given(case=idx_files())
def test_fuzzed_idx_files_are_read_exactly_or_refused_in_one_line(folder: Path, case) -> None:
    content, array = case
    path = folder / "fuzz-idx3-ubyte"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        got = refused(lambda: read_idx(path), str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if array is None:
        assert got is None, "a malformed IDX file was accepted"
    else:
        assert got is not None and got.dtype.isnative and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    # memory follows the bytes present (whatever the header claims): the file, decompressed, at most twice
    decompressed = len(gzip.decompress(content)) if array is not None and content[:2] == b"\x1f\x8b" else 0
    assert peak <= 2 * max(len(content), decompressed) + 4 * 1024 * 1024


@FUZZ
@given(content=st.binary(max_size=4000), compress=st.booleans())
def test_random_bytes_as_idx(folder: Path, content: bytes, compress: bool) -> None:
    path = folder / "random-idx1-ubyte"
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    refused(lambda: read_idx(path), str(path))


TINY_SHAPES = {
    "train_images": (6, 28, 28),
    "train_labels": (6,),
    "test_images": (4, 28, 28),
    "test_labels": (4,),
}
TINY_NAMES = {role: spec.name for role, spec in data.DATASETS["mnist"].files.items()}


def idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def tiny_set() -> dict[str, bytes]:
    """A small dataset "tiny" in DATASETS (like MNIST, 6 + 4 images, 3 classes): role -> its raw IDX bytes."""
    rng = np.random.default_rng(0)
    files, raw = {}, {}
    for role, shape in TINY_SHAPES.items():
        array = rng.integers(0, 3 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        raw[role] = idx(array)
        files[role] = FileSpec(TINY_NAMES[role], len(raw[role]), hashlib.sha256(raw[role]).hexdigest(), shape)
    spec = DatasetSpec(name="tiny", classes=("a", "b", "c"), files=files, mirrors=(), mean=0.5, std=0.25)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(data.DATASETS, "tiny", spec)
        mp.setenv("LENET_OFFLINE", "1")
        yield raw


def damaged(good: bytes, labels: bool, change: str, where: int, value: int) -> bytes:
    """`good` IDX bytes with one change that a reader must notice even without a checksum."""
    if change == "bytes":
        return np.random.default_rng(where).bytes(where % 3000)
    if change == "cut":
        return good[: where % len(good)]
    if change == "header":  # one byte of the magic or the dims
        at = where % (8 if labels else 16)
        return good[:at] + bytes([(good[at] + 1 + value % 255) % 256]) + good[at + 1 :]
    if change == "dims":  # the same data under larger dims: a header that lies about the size
        dims = struct.unpack_from(">I", good, 4)[0] * (2 + where % 1000)
        return good[:4] + struct.pack(">I", dims) + good[8:]
    if change == "trailing":
        return good + bytes(1 + where % 100)
    assert labels and change == "label"  # a label out of range
    return good[:-1] + bytes([3 + value % 253])


@FUZZ
@given(
    role=st.sampled_from(data.ROLES),
    place=st.sampled_from(["data_dir", "data_dir.gz", "cache"]),
    change=st.sampled_from(["bytes", "cut", "header", "dims", "trailing", "label"]),
    where=st.integers(0, 2**16),
    value=st.integers(0, 255),
)
def test_a_hostile_dataset_file_is_refused_and_never_cached(
    folder: Path, tiny_set: dict[str, bytes], role: str, place: str, change: str, where: int, value: int
) -> None:
    """In a user's data folder (raw or gzipped) or in the cache: a one-line DataError naming the file; a bad
    file never enters the cache and one found there is removed."""
    assume(change != "label" or role.endswith("labels"))
    bad = damaged(tiny_set[role], role.endswith("labels"), change, where, value)
    assume(bad != tiny_set[role])
    data_dir, cache = folder / "data", folder / "cache"
    for name in (data_dir, cache):
        shutil.rmtree(name, ignore_errors=True)
        name.mkdir()
    target = cache / "tiny" if place == "cache" else data_dir
    target.mkdir(exist_ok=True)
    suffix = ".gz" if place == "data_dir.gz" else ""
    for r, content in tiny_set.items():
        blob = bad if r == role else content
        (target / (TINY_NAMES[r] + suffix)).write_bytes(gzip.compress(blob, mtime=0) if suffix else blob)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENET_DATA_DIR", str(cache))
        with pytest.raises(DataError) as error:
            data.load("tiny", data_dir if place != "cache" else None)
    assert "\n" not in str(error.value) and TINY_NAMES[role] in str(error.value)
    assert not (cache / "tiny" / TINY_NAMES[role]).exists(), "a bad file is in the cache"


def test_a_data_file_declaring_more_than_its_spec_is_refused_before_decompressing(
    folder: Path, tiny_set: dict[str, bytes]
) -> None:
    """A gzip bomb: 64 KB that inflate to 64 MB behind a header of the dataset's dtype and rank that claims
    823 MB.

    Before the header was checked against the spec, the reader inflated all of it (and held it twice)."""
    data_dir = folder / "bomb"
    data_dir.mkdir()
    for role, content in tiny_set.items():
        (data_dir / TINY_NAMES[role]).write_bytes(content)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 1024 * 1024 + 1, 28, 28)  # ~823 MB of pixels
    with gzip.open(data_dir / (TINY_NAMES["train_images"] + ".gz"), "wb", compresslevel=1) as f:
        f.write(header)
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    (data_dir / TINY_NAMES["train_images"]).unlink()
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="wrong shape: expected uint8 \\(6, 28, 28\\)"):
            data.load("tiny", data_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


# ---- checkpoints ----------------------------------------------------------------------------------------

META = {
    "model": {"name": "classic", "kwargs": {}},
    "normalization": {"mean": data.MNIST_MEAN, "std": data.MNIST_STD},
    "input_shape": [1, 28, 28],
    "dataset": "mnist",
    "classes": list("0123456789"),
    "epoch": 1,
}


@functools.cache
def good_checkpoint() -> bytes:
    """A classic checkpoint with fresh weights, an optimizer state and an extra tensor, as bytes."""
    torch.manual_seed(0)
    model = build("classic")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "good.safetensors"
        checkpoint.save(path, model, META, optimizer, {"rng.torch": torch.get_rng_state()})
        return path.read_bytes()


class Case(bytes):
    """File content that prints as how it was made: hypothesis prints the cases that fail."""

    def __new__(cls, content: bytes, how: str):
        case = super().__new__(cls, content)
        case.how = how
        return case

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.how}>"


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict | str, body: bytes) -> bytes:
    """A safetensors file: the header (a dict, or any text in its place), its length before it."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "f32", "", "X"]


@st.composite
def tampered_checkpoints(draw) -> Case:
    good = good_checkpoint()
    header, body = split(good)
    names = sorted(k for k in header if k != "__metadata__")
    kinds = ["bytes", "cut", "flip", "length", "json", "offsets", "dtype", "shape", "drop", "add", "metadata"]
    how = draw(st.sampled_from([*kinds, "meta", "meta", "meta", "meta"]))  # most cases get past the layout
    if how == "bytes":
        return Case(draw(st.binary(max_size=600)), "random bytes")
    if how == "cut":
        at = draw(st.integers(0, len(good) - 1))
        return Case(good[:at], f"cut at {at}")
    if how == "flip":  # a byte in the length or the header JSON
        at, value = draw(st.integers(0, 8 + len(json.dumps(header)))), draw(st.integers(0, 255))
        return Case(good[:at] + bytes([value]) + good[at + 1 :], f"byte {at} set to {value}")
    if how == "length":
        length = draw(st.integers(0, 2**64 - 1))
        return Case(struct.pack("<Q", length) + good[8:], f"header length {length}")
    if how == "json":  # anything where the header should be: bad JSON, other types, deep nesting
        depth = draw(st.integers(1, 200_000))
        text = draw(st.sampled_from(["[" * depth, "[" * depth + "]" * depth, '{"a":' * depth]))
        text = draw(st.sampled_from([text, json.dumps(draw(json_values))]))
        return Case(join(text, body), f"header {text[:60]!r}... ({len(text)} characters)")
    name = draw(st.sampled_from(names))
    entry = header[name]
    if how == "offsets":  # past the end, overlapping, reversed, huge
        point = st.one_of(st.integers(0, len(body) + 64), st.integers(0, 2**64 - 1), st.integers(-5, -1))
        entry["data_offsets"] = draw(st.one_of(st.lists(point, min_size=2, max_size=2), json_values))
        change = f"{name} offsets {entry['data_offsets']!r}"
    elif how == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPES), json_values))
        change = f"{name} dtype {entry['dtype']!r}"
    elif how == "shape":
        dim = st.one_of(st.integers(0, 130), st.integers(0, 2**64 - 1))
        entry["shape"] = draw(st.one_of(st.lists(dim, max_size=5), json_values))
        change = f"{name} shape {entry['shape']!r}"
    elif how == "drop":
        del header[name]
        change = f"{name} dropped"
    elif how == "add":
        added = draw(st.sampled_from(["model.extra", "optimizer.x", "optimizer.9.exp_avg", "other", "a.b"]))
        header[added] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        change = f"tensor {added} added"
    elif how == "metadata":  # no "lenet" entry, or not a JSON object
        lenet = draw(st.sampled_from([{}, [], "x", {"lenet": draw(st.text(max_size=20))}]))
        header["__metadata__"] = lenet
        change = f"metadata {lenet!r}"
    else:  # one field of the "lenet" metadata dropped or replaced
        meta = json.loads(header["__metadata__"]["lenet"])
        key = draw(st.sampled_from(sorted(meta) + ["model.name", "model.kwargs", "normalization.std"]))
        outer, _, inner = key.partition(".")
        target = meta[outer] if inner else meta
        field = inner or outer
        if draw(st.booleans()):
            target.pop(field, None)
            change = f"meta {key} dropped"
        else:
            odd = [0, -1.0, float("nan"), float("inf"), 10**400, [], "classic", ["a"], {"dropout": 2}]
            target[field] = draw(st.one_of(json_values, st.sampled_from(odd)))
            change = f"meta {key} = {target[field]!r}"
        header["__metadata__"] = {"lenet": json.dumps(meta)}
    return Case(join(header, body), change)


def test_an_untampered_round_trip_loads(folder: Path) -> None:
    path = folder / "round.safetensors"
    path.write_bytes(join(*split(good_checkpoint())))
    model, meta = checkpoint.load_model(path)
    assert meta["model"]["name"] == "classic" and not model.training


@FUZZ
@given(blob=tampered_checkpoints())
def test_tampered_checkpoints_load_or_give_one_line_errors(folder: Path, blob: Case) -> None:
    path = folder / "tampered.safetensors"
    path.write_bytes(blob)
    loaded = refused(lambda: checkpoint.load(path), str(path), tally=False)
    built = refused(lambda: checkpoint.load_model(path), str(path))
    if loaded is None:
        assert built is None
    if built is not None:  # what every user of a model reads from it is there and sound
        model, meta = built
        norm = meta["normalization"]
        assert math.isfinite(norm["mean"]) and math.isfinite(norm["std"]) and norm["std"] > 0
        with torch.no_grad():
            out = model((torch.rand(1, 1, 28, 28) - norm["mean"]) / norm["std"])
        assert out.shape == (1, len(meta["classes"])) and torch.isfinite(out).all()
        assert all(isinstance(c, str) for c in meta["classes"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_hostile_files_stay_within_bounded_memory(folder: Path) -> None:
    """Peak RSS of a fresh process reading the worst cases: headers that claim terabytes."""
    header, body = split(good_checkpoint())
    name = next(k for k in header if k.startswith("model."))
    header[name]["shape"] = [2**31, 2**31]
    cases = {
        "idx_raw": bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2**31, 2**31) + bytes(1000),
        "idx_gz": gzip.compress(
            bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31) + bytes(10**6)
        ),
        "ckpt_shape.safetensors": join(header, body),
        "ckpt_length.safetensors": struct.pack("<Q", 2**63) + good_checkpoint()[8:],
    }
    for file, content in cases.items():
        (folder / file).write_bytes(content)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from lenet import checkpoint, data
        from lenet.errors import LenetError

        def peak_kb():  # peak RSS since exec (getrusage's also counts the parent's from before the exec)
            lines = open("/proc/self/status").read().splitlines()
            return int(next(line.split()[1] for line in lines if line.startswith("VmHWM")))

        folder = Path({str(folder)!r})
        before = peak_kb()
        for name in {sorted(cases)!r}:
            read = checkpoint.load_model if name.endswith(".safetensors") else data.read_idx
            try:
                read(folder / name)
                sys.exit(name + " was accepted")
            except LenetError:
                pass
        print((peak_kb() - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 64, f"peak RSS grew by {done.stdout.strip()} MB"
