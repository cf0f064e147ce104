import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet import data
from lenet.errors import LenetError

pytestmark = pytest.mark.real_data

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    blob = bytearray(png(np.zeros((1, 1), np.uint8)))
    struct.pack_into(">II", blob, 16, width, height)  # IHDR data starts after signature, length and type
    struct.pack_into(">I", blob, 29, zlib.crc32(blob[12:29]))
    return bytes(blob)


@pytest.fixture(scope="module")
def app(modern_checkpoint: Path):
    from lenet.serve import create_app

    return create_app(modern_checkpoint)


@pytest.fixture(scope="module")
def client(app):
    return fastapi_testclient.TestClient(app)


@pytest.fixture(scope="module")
def mnist_test(mnist_cache: Path) -> data.Dataset:
    return data.load("mnist", mnist_cache / "mnist")


def post_image(client, blob: bytes, kind: str = "image/png", query: str = ""):
    return client.post(f"/api/predict{query}", content=blob, headers={"content-type": kind})


def assert_error(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert words in message and "\n" not in message


# ---- the routes ------------------------------------------------------------------------------------------


def test_healthz(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_facts_come_from_the_checkpoint(client, modern_checkpoint: Path) -> None:
    from lenet.checkpoint import load_model
    from lenet.models import count_parameters

    model, meta = load_model(modern_checkpoint)
    facts = client.get("/api/model").json()
    assert facts["name"] == "modern"
    assert facts["parameters"] == count_parameters(model) == 61_932
    assert facts["dataset"] == "mnist"
    assert facts["test_accuracy"] == meta["metrics"]["test_acc"] > 0.97
    assert facts["classes"] == [str(d) for d in range(10)]
    assert facts["normalization"] == meta["normalization"]
    assert facts["backend"] == "torch" and facts["feature_maps"] is True
    assert facts["checkpoint"] == modern_checkpoint.name  # a name, never the server's folders


def test_page_and_its_files_need_no_network(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="app.js"' in page.text and 'href="style.css"' in page.text
    for route, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        response = client.get(route)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/favicon.ico").status_code == 204


def test_openapi_schema_without_cdn_docs(client) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data", "image/*"}
    assert set(body["application/json"]["schema"]["properties"]) == {"pixels", "preprocess", "features"}
    errors = schema["paths"]["/api/predict"]["post"]["responses"]
    for status in ("400", "413", "415", "422"):  # documented as they are sent: {"error": "one line"}
        assert errors[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert schema["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    read = schema["paths"]["/api/read"]["post"]
    assert set(read["requestBody"]["content"]) == set(body)
    assert set(read["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {"pixels"}
    assert {"400", "413", "415", "422"} <= set(read["responses"])
    assert read["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ReadResponse"
    }
    assert {"/api/model", "/healthz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    assert client.get("/redoc").status_code == 404


def test_png_bytes_of_real_digits(client, mnist_test: data.Dataset) -> None:
    images, labels = mnist_test.test_images[:40].numpy(), mnist_test.test_labels[:40].tolist()
    right = 0
    for pixels, label in zip(images, labels, strict=True):
        answer = post_image(client, png(pixels)).json()
        assert len(answer["probabilities"]) == 10
        assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert answer["digit"] == answer["classes"][answer["index"]]
        assert answer["index"] == int(np.argmax(answer["probabilities"]))
        assert np.asarray(answer["input"]).shape == (28, 28) and answer["features"] is None
        right += answer["digit"] == str(label)
    assert right >= 38


def test_multipart_upload_with_feature_maps(client, mnist_test: data.Dataset) -> None:
    pixels = mnist_test.test_images[0].numpy()
    files = {"file": ("seven.png", png(pixels), "image/png")}
    answer = client.post("/api/predict?features=true", files=files).json()
    assert answer["digit"] == str(int(mnist_test.test_labels[0]))
    assert np.asarray(answer["features"]["conv1"]).shape == (6, 28, 28)
    assert np.asarray(answer["features"]["conv2"]).shape == (16, 10, 10)


def test_json_pixels_are_the_network_input(client, mnist_test: data.Dataset, modern_checkpoint: Path) -> None:
    from lenet.predict import load, predict

    pixels = mnist_test.test_images[1].numpy()
    answer = client.post("/api/predict", json={"pixels": pixels.tolist(), "features": True}).json()
    assert answer["input"] == pixels.tolist()  # taken as it is
    model, meta = load(modern_checkpoint)
    expected = predict(model, pixels[None], **meta["normalization"])[0].tolist()
    assert answer["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert set(answer["features"]) == {"conv1", "conv2"}
    as_floats = client.post("/api/predict", json={"pixels": pixels.astype(float).tolist()}).json()
    assert as_floats["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6)  # 7.0: an integer

    # preprocess: true crops and centres them like an upload: a digit drawn in a corner moves to the middle
    corner = np.zeros((28, 28), np.uint8)
    corner[2:12, 3:5] = 255
    moved = client.post("/api/predict", json={"pixels": corner.tolist(), "preprocess": True}).json()
    rows, cols = np.nonzero(np.asarray(moved["input"]))
    assert 10 <= rows.mean() <= 18 and 10 <= cols.mean() <= 18


def off_centre(pixels: np.ndarray) -> np.ndarray:
    """An MNIST digit drawn small near the top-left corner of a 120x120 white page, dark ink."""
    page = np.full((120, 120), 255, np.uint8)
    page[6:34, 4:32] = 255 - pixels
    return page


def test_steps_show_how_the_input_was_made(client, mnist_test: data.Dataset) -> None:
    pixels = mnist_test.test_images[0].numpy()
    blob = png(off_centre(pixels))
    plain = post_image(client, blob).json()
    answer = post_image(client, blob, query="?steps=true").json()
    assert answer["input"] == plain["input"] and answer["digit"] == plain["digit"] == "7"
    steps = answer["steps"]
    assert steps["size"] == [120, 120]
    x0, y0, x1, y1 = steps["crop"]
    assert 4 <= x0 < x1 <= 32 and 6 <= y0 < y1 <= 34  # where the digit's ink is on the page
    fitted = np.asarray(steps["fitted"])
    assert fitted.shape == (20, 20) and fitted.max() > 200
    bx0, by0, bx1, by1 = steps["fitted_box"]
    assert max(bx1 - bx0, by1 - by0) == 20 and fitted[:, :bx0].max(initial=0) == 0
    centre = np.add(steps["centre_of_mass"], steps["shift"])
    assert np.abs(centre - 14).max() <= 0.5  # MNIST's centring, by whole pixels
    # the 20x20 fit is the input, moved by shift
    dx, dy = steps["shift"]
    assert 0 <= dx <= 8 and 0 <= dy <= 8  # the 20x20 box lies within the field
    field = np.zeros((28, 28), np.uint8)
    field[dy : dy + 20, dx : dx + 20] = fitted
    assert np.array_equal(field, np.asarray(answer["input"]))

    raw = client.post("/api/predict?steps=true", json={"pixels": pixels.tolist()}).json()
    assert raw["steps"] is None and "taken as they are" in raw["note"]
    assert plain["steps"] is None and "note" not in plain


def number_png(digits: np.ndarray, gap: int = 6, scale: int = 3) -> bytes:
    """MNIST digits (n, 28, 28) side by side, a gap between them, dark ink on white, scaled up, as a PNG."""
    space = np.zeros((28, gap), np.uint8)
    row = np.hstack([space] + [part for digit in digits for part in (digit, space)])
    image = Image.fromarray(255 - row).resize((row.shape[1] * scale, 28 * scale), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_a_number(app, client, mnist_test: data.Dataset) -> None:
    """/api/read answers as read_number does with the served model, for image bytes, a multipart upload
    and JSON pixels alike."""
    from lenet.read import read_number

    served = app.state.served
    images, labels = mnist_test.test_images[:15].numpy(), mnist_test.test_labels[:15].tolist()
    right = 0
    for k in range(0, 15, 3):
        blob = number_png(images[k : k + 3])
        answer = client.post("/api/read", content=blob, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        answer = answer.json()
        direct = read_number(blob, served.engine.probabilities, classes=served.engine.classes)
        assert answer["number"] == direct["number"] and len(answer["digits"]) == len(direct["digits"])
        assert (answer["width"], answer["height"]) == (direct["width"], direct["height"])
        for got, expected in zip(answer["digits"], direct["digits"], strict=True):
            assert got["box"] == expected["box"] and got["input"] == expected["input"].tolist()
            assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
            assert got["probability"] == max(got["probabilities"]) and got["digit"] == str(got["index"])
        right += answer["number"] == "".join(str(label) for label in labels[k : k + 3])
    assert right >= 4

    blob = number_png(images[:3])
    first = client.post("/api/read", content=blob, headers={"content-type": "image/png"}).json()
    upload = client.post("/api/read", files={"file": ("n.png", blob, "image/png")}).json()
    grey = np.asarray(Image.open(io.BytesIO(blob)).convert("L"))
    pixels = client.post("/api/read", json={"pixels": grey.tolist()}).json()
    assert first == upload
    assert pixels["number"] == first["number"] and [d["box"] for d in pixels["digits"]] == [
        d["box"] for d in first["digits"]
    ]


def test_read_errors(client) -> None:
    def read(body, kind: str = "image/png"):
        return client.post("/api/read", content=body, headers={"content-type": kind})

    assert_error(read(png(np.full((60, 200), 250, np.uint8))), 400, "blank")
    blobs = np.full((400, 600), 255, np.uint8)  # 300 blobs, a page of them: not one line of digits
    for k in range(300):
        y, x = 10 + 26 * (k // 20), 10 + 29 * (k % 20)
        blobs[y : y + 12, x : x + 9] = 0
    assert_error(read(png(blobs)), 422, "separate marks")
    assert_error(read(b"not an image"), 415, "not an image")
    assert_error(read(b"hello", "text/plain"), 415, "content type")
    from lenet.serve import MAX_BODY_BYTES

    assert_error(read(b"\x89PNG" + bytes(MAX_BODY_BYTES)), 413, "bytes")
    assert_error(client.post("/api/read", json={"pixels": []}), 422, "pixels")
    assert_error(client.post("/api/read", json={"pixels": [[0, 1], [2]]}), 400, "2-D array")
    assert_error(client.post("/api/read", json={"pixels": [[0]], "features": True}), 422, "features")
    assert_error(client.post("/api/read?invert=maybe", content=png(blobs)), 422, "invert")


def test_requests_ready_together_share_a_forward_pass(
    app, client, mnist_test: data.Dataset, monkeypatch
) -> None:
    """Requests in flight at once are answered from one batched forward pass, each with its own answer."""
    import asyncio

    import httpx

    blobs = [png(pixels) for pixels in mnist_test.test_images[:12].numpy()]
    alone = [post_image(client, blob).json() for blob in blobs]
    batcher, sizes = app.state.served.batcher, []
    forward = batcher.probabilities_of

    def counted(images):
        sizes.append(len(images))
        return forward(images)

    monkeypatch.setattr(batcher, "probabilities_of", counted)

    async def all_at_once() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lenet") as together:
            posts = (
                together.post("/api/predict", content=b, headers={"content-type": "image/png"}) for b in blobs
            )
            return await asyncio.gather(*posts)

    answers = [response.json() for response in asyncio.run(all_at_once())]
    assert sum(sizes) == len(blobs) and max(sizes) > 1
    for one, batched in zip(alone, answers, strict=True):
        assert batched["digit"] == one["digit"] and batched["input"] == one["input"]
        assert batched["probabilities"] == pytest.approx(one["probabilities"], abs=1e-6)


# ---- errors ----------------------------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(client) -> None:
    from lenet.serve import MAX_BODY_BYTES

    big = b"\x89PNG" + bytes(MAX_BODY_BYTES)
    assert_error(post_image(client, big), 413, "bytes")  # told by Content-Length
    files = {"file": ("big.png", big, "image/png")}
    assert_error(client.post("/api/predict", files=files), 413, "bytes")

    stream = iter([bytes(MAX_BODY_BYTES), b"x"])
    response = client.post("/api/predict", content=stream, headers={"content-type": "image/png"})
    assert_error(response, 413, "bytes")  # no Content-Length: counted as it arrives
    just_fits = post_image(client, png(np.zeros((1, 1), np.uint8)) + bytes(MAX_BODY_BYTES - 100))
    assert_error(just_fits, 400, "blank")


def test_reading_stops_at_the_limit(app) -> None:
    """At the ASGI level: a streamed body is refused after the chunk that passes the limit, not at its end;
    the rest is then read and dropped (to its end, or DISCARD_BYTES in all) before the answer completes."""
    import asyncio

    from lenet.serve import DISCARD_BYTES, MAX_BODY_BYTES

    chunk = 64 * 1024
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    def refuse(chunks: int | None) -> tuple[int, int, list[dict]]:
        """(bytes read when the answer started, bytes read in all, the messages sent) for a body of
        `chunks` chunks (None: without end)."""
        read, sent, answered_at = [], [], []

        async def receive() -> dict:
            read.append(chunk)
            return {
                "type": "http.request",
                "body": bytes(chunk),
                "more_body": chunks is None or len(read) < chunks,
            }

        async def send(message: dict) -> None:
            answered_at.append(sum(read))
            sent.append(message)

        asyncio.run(app(scope, receive, send))
        return answered_at[0], sum(read), sent

    answered_at, read, sent = refuse(64)
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert answered_at == MAX_BODY_BYTES + chunk  # one chunk past the limit
    assert read == 64 * chunk and not sent[-1].get("more_body")  # then the rest, dropped, and the end
    answered_at, read, _ = refuse(None)
    assert answered_at == MAX_BODY_BYTES + chunk and read == DISCARD_BYTES + chunk


def test_non_images_get_415(client) -> None:
    assert_error(post_image(client, b"hello, not a picture"), 415, "not an image")
    assert_error(post_image(client, b""), 415, "not an image")
    files = {"file": ("notes.png", b"plain text", "image/png")}
    assert_error(client.post("/api/predict", files=files), 415, "not an image")
    assert_error(post_image(client, b"hello", kind="text/plain"), 415, "content type text/plain")
    assert_error(client.post("/api/predict", content=b"hello"), 415, "content type missing")


def test_unusable_images_get_400(client) -> None:
    blank = np.full((40, 40), 255, np.uint8)
    assert_error(post_image(client, png(blank)), 400, "blank")
    assert_error(post_image(client, png_claiming(20_000, 20_000)), 400, "bomb")
    assert_error(post_image(client, png_claiming(7_000, 7_000)), 400, "pixels")
    truncated = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))[:200]
    assert_error(post_image(client, truncated), 400, "not a readable image")
    bad_json = b'{"pixels": [[0, 1'
    assert_error(post_image(client, bad_json, kind="application/json"), 400, "not valid JSON")


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"pixels": [[0] * 28] * 27}, "pixels"),
        ({"pixels": [[0] * 27] * 28}, "pixels.0"),
        ({"pixels": [[0] * 28] * 27 + [[0] * 27 + [256]]}, "pixels.27.27"),
        ({"pixels": [[-1] * 28] * 28}, "pixels.0.0"),
        ({"pixels": [["a"] * 28] * 28}, "pixels.0.0"),
        ({"pixels": [["7"] * 28] * 28}, "pixels.0.0"),  # what the schema calls an integer, and nothing else
        ({"pixels": [[True] * 28] * 28}, "pixels.0.0"),
        ({"pixels": [[7.5] * 28] * 28}, "pixels.0.0"),
        ({"pixels": [[0] * 28] * 28, "preprocess": 1}, "preprocess"),
        ({"pixels": [[0] * 28] * 28, "features": "yes"}, "features"),
        ({"pixels": "0" * 784}, "pixels"),
        ({"pixels": [[0] * 28] * 28, "feature": True}, "feature"),
        ({"image": []}, "pixels"),
        ([1, 2, 3], "body"),
    ],
)
def test_wrong_json_shapes_get_422(client, body, where: str) -> None:
    response = client.post("/api/predict", json=body)
    assert_error(response, 422, f"{where}: ")


def test_wrong_form_and_query_get_422(client, mnist_test: data.Dataset) -> None:
    blob = png(mnist_test.test_images[0].numpy())
    response = client.post("/api/predict", files={"image": ("a.png", blob, "image/png")})
    assert_error(response, 422, "field 'file'")
    assert_error(post_image(client, blob, query="?invert=maybe"), 422, "invert")
    assert_error(post_image(client, blob, query="?features=perhaps"), 422, "features")


def test_unknown_routes_and_methods(client) -> None:
    assert_error(client.get("/api/nothing"), 404, "Not Found")
    assert_error(client.get("/api/predict"), 405, "Method Not Allowed")
    assert_error(client.post("/api/model"), 405, "Method Not Allowed")


def test_random_bodies_never_give_500(client, mnist_test: data.Dataset) -> None:
    rng = random.Random(0)
    blob = png(mnist_test.test_images[2].numpy())
    kinds = ["image/png", "image/jpeg", "application/json", "multipart/form-data", "application/octet-stream"]
    for _ in range(60):
        kind = rng.choice(kinds)
        body = rng.choice([rng.randbytes(rng.randrange(0, 3000)), blob[: rng.randrange(len(blob))]])
        if rng.random() < 0.3:  # flip a few bytes in a real PNG
            body = bytearray(blob)
            for _ in range(5):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        response = post_image(client, body, kind=kind)
        assert response.status_code in (200, 400, 413, 415, 422), (kind, response.text)
        assert "error" in response.json() or "digit" in response.json()


def test_a_server_bug_is_a_logged_json_500(app, monkeypatch, mnist_test: data.Dataset, caplog) -> None:
    import lenet.predict

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(lenet.predict, "predict", broken)
    client = fastapi_testclient.TestClient(app, raise_server_exceptions=False)
    response = post_image(client, png(mnist_test.test_images[0].numpy()))
    assert_error(response, 500, "internal error")
    assert "a bug" in caplog.text


# ---- making the app ---------------------------------------------------------------------------------------


def test_create_app_refuses_bad_inputs(tmp_path: Path, modern_checkpoint: Path) -> None:
    from lenet.serve import create_app

    with pytest.raises(LenetError, match="no such file"):
        create_app(tmp_path / "missing.safetensors")
    with pytest.raises(LenetError, match="--backend"):
        create_app(modern_checkpoint, backend="tensorflow")
    with pytest.raises(LenetError, match="serves an .onnx export"):
        create_app(modern_checkpoint, backend="onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not onnx")
    with pytest.raises(LenetError, match="--backend onnxruntime"):
        create_app(onnx_file)
    with pytest.raises(LenetError, match="not a readable ONNX model"):
        create_app(onnx_file, backend="onnxruntime")
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_bytes(b"hello")
    with pytest.raises(LenetError, match="notes.safetensors"):
        create_app(not_a_checkpoint)


def test_onnxruntime_backend(modern_checkpoint: Path, mnist_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from lenet.export import export
    from lenet.serve import create_app

    path = tmp_path / "modern.onnx"
    export(modern_checkpoint, "onnx", out=path, data_dir=mnist_cache / "mnist")
    client = fastapi_testclient.TestClient(create_app(path, backend="onnxruntime"))
    facts = client.get("/api/model").json()
    assert facts["backend"] == "onnxruntime" and facts["name"] == "modern" and facts["feature_maps"] is False
    pixels = data.load("mnist", mnist_cache / "mnist").test_images[0].numpy()
    answer = post_image(client, png(pixels), query="?features=true").json()
    assert answer["digit"] == "7" and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert answer["features"] is None and "not available" in answer["note"]


def test_serve_binds_this_machine_by_default() -> None:
    import inspect

    from lenet.cli import build_parser
    from lenet.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["serve", "best.safetensors"])
    assert (args.host, args.port, args.backend) == ("127.0.0.1", 8000, "auto")


def test_load_benchmark_runs(mnist_cache: Path, monkeypatch) -> None:
    """`lenet bench serve --quick`: a real server process under a real load process; numbers, no errors."""
    from lenet import bench

    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_cache))
    result = bench.run("serve", quick=True)
    assert result["errors"] == 0 and result["baseline_errors"] == 0 and result["requests"] == 300
    assert result["requests_per_s"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["baseline_requests_per_s"] > 0


def test_several_workers_share_the_port_and_answer(mnist_test: data.Dataset) -> None:
    """`lenet serve --workers 2`: two server processes under uvicorn's supervisor, both loaded, one port."""
    import http.client
    import json

    from lenet import bench

    with bench.served_modern(workers=2) as (port, server, _):
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        if children.exists():  # the workers, beside multiprocessing's resource tracker
            commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children.read_text().split()]
            assert sum(b"spawn_main" in command for command in commands) == 2
        for pixels in mnist_test.test_images[:8].numpy():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a new connection each
            connection.request("POST", "/api/predict", buffer.getvalue(), {"Content-Type": "image/png"})
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["digit"] in mnist_test.classes
            connection.close()


# `pip install -e .` without extras: the import system finds none of the packages named in argv[1]
WITHOUT_SERVE_EXTRA = """
import sys

MISSING = set(sys.argv[1].split(","))


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, Missing())
from lenet.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("missing", "needed"),
    [
        ("fastapi,starlette,anyio,uvicorn,orjson,python_multipart,multipart,httptools,uvloop", "fastapi"),
        ("uvicorn", "uvicorn"),
        ("orjson", "orjson"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "bench serve"])
def test_without_the_serve_extra_one_line_names_it(
    tmp_path: Path, missing: str, needed: str, command: str
) -> None:
    import subprocess
    import sys

    args = ["serve", str(tmp_path / "best.safetensors")] if command == "serve" else ["bench", "serve"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVE_EXTRA, missing, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"lenet: error: lenet {command} needs {needed}: pip install 'lenet[serve]'\n"


def test_workers_must_be_positive(modern_checkpoint: Path) -> None:
    from lenet.serve import serve

    with pytest.raises(LenetError, match="--workers: expected 1 or more, got 0"):
        serve(modern_checkpoint, workers=0)
