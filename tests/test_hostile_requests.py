"""Hostile images and requests: fuzzed images through `preprocess` and fuzzed requests through the HTTP API
give a 28x28 image or a one-line LenetError, a digit or a 4xx JSON error; never another exception, a 500 or
memory beyond a fixed bound."""

import io
import json
import math
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from lenet import checkpoint, data
from lenet.errors import LenetError
from lenet.models import build
from lenet.preprocess import MAX_PIXELS, MAX_SIDE, preprocess

fastapi_testclient = pytest.importorskip("fastapi.testclient")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MODES = ["1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "I;16", "I;16B", "LAB", "HSV"]
FORMATS = ["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "PPM", "ICO", "TGA", "PCX"]


class Blob(bytes):
    """Encoded bytes that print as how they were made: hypothesis prints the cases that fail."""

    def __new__(cls, content: bytes, how: str):
        blob = super().__new__(cls, content)
        blob.how = how
        return blob

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.how}>"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def stroke(size: tuple[int, int], seed: int) -> Image.Image:
    """A dark bar (a "1") on light paper, so that some fuzzed images hold a digit to find."""
    w, h = size
    pixels = np.full((h, w), 230, np.uint8)
    pixels[h // 5 : h - h // 5 + 1, max(0, w // 2 - w // 10) : w // 2 + w // 10 + 1] = 20
    noise = np.random.default_rng(seed).integers(0, 12, (h, w), dtype=np.uint8)
    return Image.fromarray(pixels - noise)


@st.composite
def images(draw) -> Blob:
    """An image file: any mode, format and size (1x100000 included), noise or a digit, animated or not,
    with EXIF or transparency, possibly cut short or with bytes overwritten."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    side = st.integers(1, 96)
    size = draw(st.one_of(st.tuples(side, side), st.sampled_from([(1, 100_000), (100_000, 1), (3, 20_000)])))
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        image = stroke(size, seed)
    else:
        image = Image.frombytes("L", size, np.random.default_rng(seed).bytes(size[0] * size[1]))
    try:
        image = image.convert(mode)
    except ValueError:
        image = image.convert("RGB")
    options = {}
    extra = draw(st.sampled_from(["", "", "exif", "transparency", "frames"]))
    if extra == "exif":
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # orientation, 0 and 9 out of range
        options["exif"] = exif.tobytes()
    elif extra == "transparency" and image.mode in ("L", "P", "RGB"):
        options["transparency"] = 0 if image.mode != "RGB" else (0, 0, 0)
    elif extra == "frames":
        options.update(save_all=True, append_images=[image.transpose(Image.Transpose.ROTATE_180)] * 2)
    try:
        blob = encode(image, fmt, **options)
    except Exception:  # a mode, size or option the format cannot hold (Pillow's errors vary by format)
        blob = encode(image.convert("RGB"), "PNG")
        fmt = f"PNG (not {fmt})"
    how = f"{image.mode} {size[0]}x{size[1]} {fmt} {extra}".strip()
    damage = draw(st.sampled_from(["", "", "", "cut", "overwrite"]))
    # The place is drawn as a fraction of the file: a draw bounded by len(blob) would make hypothesis's
    # choice sequence depend on an encoder's output size, which it refuses as a flaky strategy.
    at = round(len(blob) * draw(st.integers(0, 2**16)) / 2**16) if damage else 0
    if damage == "cut":
        blob, how = blob[:at], f"{how}, cut at {at}"
    elif damage == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=16))
        blob, how = blob[:at] + junk + blob[at + len(junk) :], f"{how}, {junk!r} at {at}"
    return Blob(blob, how)


def count(outcome: str) -> None:
    """Tally an outcome in hypothesis's statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


def preprocessed(source, name: str = "upload") -> np.ndarray | None:
    """preprocess(source): the 28x28 MNIST-style image, or None where it gave a one-line LenetError."""
    try:
        out = preprocess(source, name=name)
    except LenetError as e:
        message = str(e)
        assert message.startswith(f"{name}: ") and "\n" not in message, message
        count("refused: " + message.removeprefix(f"{name}: ").split(" (")[0].split(",")[0])
        return None
    assert out.shape == (28, 28) and out.dtype == np.uint8
    count("read")
    return out


@FUZZ
@given(blob=images())
def test_fuzzed_image_files_preprocess_or_give_one_line_errors(blob: Blob) -> None:
    preprocessed(blob)


@FUZZ
@given(blob=st.binary(max_size=3000))
def test_random_bytes_as_an_image(blob: bytes) -> None:
    assert preprocessed(blob) is None


def test_images_of_every_mode_and_size_with_a_digit_are_read() -> None:
    """The fuzz above accepts refusals; here a clear digit in every mode and format that holds it, small and
    large (large ones are box-reduced first: 1-bit, palette and 16-bit images were refused there), must come
    out as a digit. LAB is left out: Pillow cannot turn it into grey levels, and it is refused in one line."""
    checked, failures = [], []
    for mode in MODES:
        for size in ((60, 80), (90, 1200)):
            image = stroke(size, 0)
            for fmt in ("PNG", "TIFF"):
                try:
                    blob = encode(image.convert(mode), fmt)
                except (OSError, ValueError, KeyError):
                    continue
                with Image.open(io.BytesIO(blob)) as stored:
                    if stored.mode != mode or mode == "LAB":  # stored in another mode
                        continue
                checked.append(f"{mode} {size[0]}x{size[1]} {fmt}")
                out = preprocessed(blob)
                if out is None or out.max() < 200:
                    failures.append(checked[-1])
    assert not failures, failures
    assert {"1 90x1200 PNG", "P 90x1200 PNG", "I;16 90x1200 PNG", "RGBA 90x1200 TIFF"} <= set(checked)


array_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 255, 128.5, "7", None, True, [1], {"a": 1}]),
)


@FUZZ
@pytest.mark.filterwarnings("ignore:Casting complex values", "ignore:overflow encountered in cast")
@given(
    source=st.one_of(
        st.lists(st.lists(array_values, min_size=0, max_size=30), max_size=30),
        st.recursive(array_values, lambda inner: st.lists(inner, max_size=3), max_leaves=30),
        st.integers(1, 80).flatmap(
            lambda n: st.sampled_from(["u1", "f4", "f8", "i8", "c8", "?", "O", "U3"]).map(
                lambda dtype: np.resize(np.arange(n * n) % 256, (n, n)).astype(dtype)
            )
        ),
    )
)
def test_fuzzed_arrays_preprocess_or_give_one_line_errors(source) -> None:
    preprocessed(source, name="array")


def test_deeply_nested_lists_are_refused() -> None:
    nested: list = [0]
    for _ in range(100_000):
        nested = [nested]
    assert preprocessed(nested, name="array") is None
    assert preprocessed(torch.zeros(1, 1, 1, 28, 28), name="array") is None


# ---- the HTTP API through FastAPI's test client -----------------------------------------------------------

META = {
    "model": {"name": "modern", "kwargs": {}},
    "normalization": {"mean": data.MNIST_MEAN, "std": data.MNIST_STD},
    "input_shape": [1, 28, 28],
    "dataset": "mnist",
    "classes": list(data.DATASETS["mnist"].classes),
}


@pytest.fixture(scope="module")
def client():
    """The app serving a `modern` checkpoint with fresh weights (what it answers does not matter here)."""
    from lenet.serve import create_app

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "modern.safetensors"
        torch.manual_seed(0)
        checkpoint.save(path, build("modern").eval(), META)
        yield fastapi_testclient.TestClient(create_app(path))


def pixels_json(draw) -> bytes:
    """JSON near the {"pixels": 28x28} schema: a wrong shape, a bad element, deep nesting, odd numbers."""
    rows = [[draw(st.integers(0, 255)) for _ in range(28)] for _ in range(28)]
    how = draw(st.sampled_from(["good", "element", "rows", "deep", "keys", "raw"]))
    body: object = {"pixels": rows}
    if how == "element":
        y, x = draw(st.integers(0, 27)), draw(st.integers(0, 27))
        rows[y][x] = draw(st.one_of(array_values, st.sampled_from([-1, 256, 7.5, 1e400, 2**64, "x", [[0]]])))
    elif how == "rows":
        body = {"pixels": rows[: draw(st.integers(0, 40))] + [rows[0]] * draw(st.integers(0, 3))}
    elif how == "deep":
        depth = draw(st.integers(10, 100_000))
        return b'{"pixels": ' + b"[" * depth + b"0" + b"]" * depth + b"}"
    elif how == "keys":
        body = {
            "pixels": rows,
            draw(st.sampled_from(["preprocess", "features", "extra"])): draw(array_values),
        }
    text = json.dumps(body, allow_nan=True).encode()
    if how == "raw":  # JSON's neighbours: NaN and Infinity literals, cut short, not UTF-8
        text = draw(
            st.sampled_from([text.replace(b"0", b"NaN", 1), text[: draw(st.integers(0, 50))], b"\xff"])
        )
    return text


def multipart(draw) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["lenet", "", "x" * 300]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["file", "image", "pixels", '"oops']))
        content = draw(st.one_of(images(), st.binary(max_size=200)))
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    kind = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data"]))
    return kind, body


@st.composite
def requests(draw) -> tuple[str, str, Blob]:
    """(query, content type, body) for POST /api/predict."""
    query = draw(
        st.sampled_from(["", "", "", "?features=true", "?invert=yes", "?invert=maybe", "?features=2"])
    )
    how = draw(st.sampled_from(["image", "image", "json", "multipart", "random"]))
    if how == "image":
        body = draw(images())
        kind = draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "IMAGE/GIF"]))
    elif how == "json":
        body, kind = Blob(pixels_json(draw), "JSON"), "application/json"
    elif how == "multipart":
        kind, content = multipart(draw)
        body = Blob(content, "multipart")
    else:
        kind = draw(
            st.sampled_from(
                ["", "text/plain", "application/json", "image/svg+xml", "application/x-www-form-urlencoded"]
            )
        )
        body = Blob(draw(st.binary(max_size=2000)), "random bytes")
    return query, kind, body


def assert_answer(response, allowed=(200, 400, 413, 415, 422)) -> dict:
    assert response.status_code in allowed, (response.status_code, response.text[:200])
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    count(f"HTTP {response.status_code}")
    if response.status_code == 200 and "number" in answer:  # POST /api/read
        assert answer["number"] == "".join(digit["digit"] for digit in answer["digits"]) != ""
        for digit in answer["digits"]:
            x0, y0, x1, y1 = digit["box"]
            assert 0 <= x0 < x1 <= answer["width"] and 0 <= y0 < y1 <= answer["height"], digit
            assert math.isclose(sum(digit["probabilities"]), 1, abs_tol=1e-4)
    elif response.status_code == 200:
        assert answer["digit"] in META["classes"] and len(answer["probabilities"]) == 10
        assert math.isclose(sum(answer["probabilities"]), 1, abs_tol=1e-4)
    else:
        assert answer["error"] and "\n" not in answer["error"]
    return answer


def send(client, route: str, case: tuple):
    """POST one generated request (query, content type or None, body) to route."""
    query, kind, body = case
    headers = {"content-type": kind} if kind else {}
    return client.post(f"{route}{query}", content=bytes(body), headers=headers)


@settings(FUZZ, max_examples=200)
@given(case=requests())
def test_fuzzed_requests_get_a_digit_or_a_4xx(client, case) -> None:
    assert_answer(send(client, "/api/predict", case))


@settings(FUZZ, max_examples=150)
@given(case=requests())
def test_fuzzed_requests_to_read_get_a_number_or_a_4xx(client, case) -> None:
    """The same requests to POST /api/read (whose JSON takes pixels of any size, without predict's keys)."""
    assert_answer(send(client, "/api/read", case))


def test_the_server_still_answers_after_the_fuzz(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    good = encode(stroke((40, 50), 0), "PNG")
    assert assert_answer(client.post("/api/predict", content=good, headers={"content-type": "image/png"}))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_api_answers_as_its_own_schema_says(client, mode: str) -> None:
    """schemathesis, from /openapi.json: requests that fit the schema (positive) and requests that break it
    (negative), for every operation that takes any input. Every answer must be a documented status, with
    the documented content type and body (errors included); never a 500; and what breaks the schema is
    refused."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    generation = schemathesis.GenerationMode(mode)
    answer_checks = [
        not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
        checks.negative_data_rejection,
    ]
    answers: Counter = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} == {
        "POST /api/predict",
        "POST /api/read",
        "GET /api/model",
        "GET /healthz",
    }
    for operation in operations:
        if not generation.is_positive and not (operation.query or operation.body):
            continue  # nothing there to break

        @settings(FUZZ, max_examples=200)
        @given(case=operation.as_strategy(generation))
        def call(case) -> None:
            response = case.call_and_validate(checks=answer_checks)
            answers[f"{case.method} {case.path} {case.media_type or ''} HTTP {response.status_code}"] += 1

        call()
    print(f"\n{mode}:", dict(sorted(answers.items())))


meta_values = st.one_of(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    st.lists(st.integers(0, 9) | st.text(max_size=2), max_size=12),
    st.dictionaries(
        st.sampled_from(["test_acc", "mean", "std", "name", "kwargs"]), st.floats() | st.text(max_size=3)
    ),
)


@settings(FUZZ, max_examples=40)
@given(
    key=st.sampled_from(["metrics", "epoch", "dataset", "classes", "normalization", "input_shape", "model"]),
    value=meta_values,
)
def test_a_tampered_checkpoint_is_refused_at_start_or_served_without_500(key: str, value) -> None:
    """A checkpoint with one metadata field replaced: create_app refuses it in one line, or /api/model and
    /api/predict answer 200 (facts of the wrong type shown as null)."""
    from lenet.serve import create_app

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tampered.safetensors"
        torch.manual_seed(0)
        checkpoint.save(path, build("modern").eval(), {**META, key: value})
        try:
            app = create_app(path)
        except LenetError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            count("refused at start")
            return
    served = fastapi_testclient.TestClient(app, raise_server_exceptions=False)
    facts = served.get("/api/model")
    assert facts.status_code == 200, facts.text
    assert_answer(served.post("/api/predict", json={"pixels": [[0] * 28] * 28}), allowed=(200,))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def transparent_png(
    width: int, height: int, exif: bytes = b"", claim: tuple[int, int] | None = None
) -> bytes:
    """An RGBA PNG of zeros, written by hand (Pillow would hold the whole image to encode it); `claim`: the
    size its header states instead (a decompression bomb), `exif`: an eXIf chunk."""
    stream, compressed = zlib.compressobj(1), []
    row = bytes(1 + 4 * width)  # filter byte 0, then RGBA
    rows_per_chunk = max(1, (1 << 22) // len(row))
    for start in range(0, height, rows_per_chunk):
        compressed.append(stream.compress(row * min(rows_per_chunk, height - start)))
    compressed.append(stream.flush())
    header = struct.pack(">IIBBBBB", *(claim or (width, height)), 8, 6, 0, 0, 0)
    chunks = [png_chunk(b"IHDR", header)]
    if exif:
        chunks.append(png_chunk(b"eXIf", exif))
    chunks += [png_chunk(b"IDAT", b"".join(compressed)), png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def bombs() -> dict[str, bytes]:
    """Small files that decode to the most memory `preprocess` allows, or claim far more."""
    side = math.isqrt(MAX_PIXELS)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    frame = Image.new("P", (side, side))
    return {
        "rgba-max-pixels-exif.png": transparent_png(side, side, exif.tobytes().removeprefix(b"Exif\0\0")),
        "one-pixel-wide.png": transparent_png(1, 1, claim=(1, MAX_PIXELS)),
        "tall.png": transparent_png(MAX_PIXELS // MAX_SIDE, MAX_SIDE),
        "claims-4-gigapixels.png": transparent_png(1, 1, claim=(65_535, 65_535)),
        "animated.gif": encode(frame, "GIF", save_all=True, append_images=[frame] * 3),
    }


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_decompression_bombs_stay_within_bounded_memory(tmp_path: Path) -> None:
    """Peak RSS of a fresh process preprocessing each bomb stays within two decoded RGBA images of MAX_PIXELS
    (Pillow's reduce() premultiplies alpha in a copy) plus 48 MB."""
    names = []
    for name, blob in bombs().items():
        (tmp_path / name).write_bytes(blob)
        names.append(name)
    limit_mb = 2 * 4 * MAX_PIXELS / 2**20 + 48
    script = textwrap.dedent(
        """
        import sys
        from lenet.errors import LenetError

        def peak_kb():  # peak RSS since exec (getrusage's also counts the parent's from before the exec)
            lines = open("/proc/self/status").read().splitlines()
            return int(next(line.split()[1] for line in lines if line.startswith("VmHWM")))

        from lenet.preprocess import preprocess
        before = peak_kb()
        try:
            preprocess(sys.argv[1])
        except LenetError:
            pass
        print((peak_kb() - before) // 1024)
        """
    )
    peaks = {}
    for name in names:
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        peaks[name] = int(done.stdout)
    print("peak RSS growth (MB):", peaks)
    assert all(mb <= limit_mb for mb in peaks.values()), (peaks, limit_mb)
