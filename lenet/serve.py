"""Draw a digit: the HTTP API and the page that uses it (FastAPI + uvicorn).

Routes: `/` (the drawing page; its script and style sheet beside it), `POST /api/predict` (one digit),
`POST /api/read` (a number: one line of digits), `GET /api/model`, `GET /healthz` and the OpenAPI schema at
`/openapi.json`. Swagger's /docs is left out: it loads its script from a CDN, and the page must work
offline.

Safety: the model is loaded once, when the app is made; requests carry pixels only, so no route loads a
model, reads a path (the page's three files are read into memory at start) or fetches a URL. Bodies over
MAX_BODY_BYTES get 413, checked from Content-Length and again while the body is read, so a client that
lies or streams never makes the server hold more; the rest of such a body is read and dropped, within
DISCARD_BYTES and DISCARD_SECONDS, so that a client that sends all of it before reading sees the 413 (see
_BodyLimit). Every error is JSON `{"error": "one line"}`; what a client sends never gives 500.

Speed: a small image is preprocessed on the event loop, the forward passes of all requests that are
ready at the same moment run as one batch (_Batcher), and an answer's head and body leave in one send
(_PairedWrites). Reading a number (segmentation, several candidate digits) and large images go to worker
threads, the largest one per CPU at a time.
"""

import asyncio
import dataclasses
import gc
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from lenet.errors import LenetError, optional
from lenet.preprocess import preprocess
from lenet.preprocess import steps as preprocess_steps
from lenet.read import NoNumberError, read_number

try:
    import anyio.to_thread
    import orjson  # 10x faster than json for the 800 numbers of an answer
    import python_multipart  # noqa: F401  (starlette parses multipart uploads with it)
    import uvicorn
    from fastapi import APIRouter, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
except ImportError:  # without the serve extra: one line naming it (the CLI exits 2), not a traceback
    optional("fastapi", "uvicorn", "orjson", "python_multipart", purpose="lenet serve")
    raise

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB: a phone photo as JPEG fits; the page sends a few KB
# What is read and dropped of a refused body before the connection closes: bodies up to DISCARD_BYTES in
# all, sent within DISCARD_SECONDS. Larger or slower ones are cut off there, and their sender may see a reset.
DISCARD_BYTES = 16 * MAX_BODY_BYTES
DISCARD_SECONDS = 10.0
BACKENDS = ("torch", "onnxruntime")
STATIC = Path(__file__).parent / "static"
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The page needs nothing from elsewhere: the browser refuses any attempt to load from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
IMAGE_TYPES = ("image/", "application/octet-stream")
FEATURE_DECIMALS = 3
INLINE_MAX_PIXELS = 256 * 256  # images up to this size are preprocessed on the event loop (about 1 ms)
LARGE_PIXELS = 1024 * 1024  # larger ones are decoded one per CPU at a time (each may hold up to ~320 MB)

log = logging.getLogger("lenet.serve")


# ---- the model -------------------------------------------------------------------------------------------


class _Torch:
    """A checkpoint in PyTorch: probabilities for uint8 (N, 28, 28) images, conv feature maps for one."""

    has_features = True

    def __init__(self, path: Path):
        from lenet.models import count_parameters
        from lenet.predict import fold_batch_norm, load

        model, meta = load(path, "cpu", fold=False)
        self.parameters = count_parameters(model)  # as trained, before batch norms are folded away
        self.model = fold_batch_norm(model)
        self.mean, self.std = meta["normalization"]["mean"], meta["normalization"]["std"]
        self.classes = list(meta["classes"])
        metrics = meta.get("metrics")
        self.facts = {
            "name": meta["model"]["name"],
            "parameters": self.parameters,
            "dataset": meta.get("dataset"),
            "test_accuracy": _fact(metrics.get("test_acc") if isinstance(metrics, dict) else None, float),
            "epoch": _fact(meta.get("epoch"), int),
            "normalization": {"mean": self.mean, "std": self.std},
        }

    def probabilities(self, images: np.ndarray) -> list[list[float]]:
        from lenet.predict import predict

        return predict(self.model, images, self.mean, self.std).tolist()

    def features(self, image: np.ndarray) -> dict[str, list]:
        from lenet.predict import feature_maps

        maps = feature_maps(self.model, image, self.mean, self.std)  # conv1 (6, 28, 28), conv2 (16, 10, 10)
        return {name: np.round(m.numpy(), FEATURE_DECIMALS).tolist() for name, m in maps.items()}


class _Onnx:
    """An ONNX export in ONNX Runtime: probabilities only (the graph does not expose inner layers)."""

    has_features = False

    def __init__(self, path: Path):
        from lenet.export import OnnxModel

        self.model = OnnxModel(path, threads=1)
        self.classes = list(self.model.classes)
        norm = self.model.normalization
        self.facts = {
            "name": (self.model.metadata.get("model") or {}).get("name"),
            "parameters": None,  # not part of an export's metadata
            "dataset": self.model.dataset,
            "test_accuracy": None,
            "epoch": None,
            "normalization": {"mean": norm["mean"], "std": norm["std"]},
            "quantization": self.model.quantization,
        }

    def probabilities(self, images: np.ndarray) -> list[list[float]]:
        return self.model.predict(images).tolist()


def _fact(value: Any, kind: type) -> Any:
    """An optional fact from a checkpoint's metadata, or None where it is of another kind or not finite:
    checkpoints are load_model-checked for what predictions need, not for what /api/model shows."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        return None
    return value if kind is not float or math.isfinite(value) else None


def _open_model(path: Path, backend: str) -> _Torch | _Onnx:
    if backend not in BACKENDS:
        raise LenetError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if not path.is_file():
        raise LenetError(f"{path}: no such file")
    if backend == "onnxruntime":
        if path.suffix != ".onnx":
            raise LenetError(f"{path}: --backend onnxruntime serves an .onnx export (make one: lenet export)")
        return _Onnx(path)
    if path.suffix == ".onnx":
        raise LenetError(f"{path}: an ONNX export; serve it with --backend onnxruntime")
    return _Torch(path)


def _image_pixels(data: bytes) -> int | None:
    """Width x height from the image's header, or None where Pillow recognises no image format."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return image.width * image.height
    except UnidentifiedImageError:
        return None
    except Exception:  # recognised but refused (a bomb, a broken header): preprocess says why, as a 400
        return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Batcher:
    """One forward pass for the images of all the requests that are ready at the same moment.

    Under load many requests are ready at once, and a pass over N small images costs far less than N
    passes over one (a layer's fixed cost per call is most of one image's time). No timer: a request's
    image joins the batch, and the batch runs once the event loop has run every task that was ready when
    the first image joined, so a request on its own goes through at once.
    """

    def __init__(self, probabilities: Any):
        self.probabilities_of = probabilities  # uint8 (N, 28, 28) -> N lists of probabilities
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []

    async def probabilities(self, image: np.ndarray) -> list[float]:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self.waiting.append((image, answer))
        if len(self.waiting) == 1:
            loop.call_soon(self._run)
        return await answer

    def _run(self) -> None:
        batch, self.waiting = self.waiting, []
        try:
            rows = self.probabilities_of(np.stack([image for image, _ in batch]))
        except Exception as e:  # a bug: every request of the batch answers 500 and logs it
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(e)
            return
        for (_, answer), row in zip(batch, rows, strict=True):
            if not answer.done():
                answer.set_result(row)


@dataclasses.dataclass(frozen=True)
class _Asked:
    """What one POST /api/predict asks: the image (encoded bytes, or JSON pixels as uint8 (28, 28)), which
    way its ink goes, and what to return beside the digit."""

    source: bytes | np.ndarray
    invert: str = "auto"
    raw: bool = False  # pixels to take as they are (the network's input), not preprocessed
    features: bool = False  # the conv feature maps
    steps: bool = False  # how preprocessing made the input


class _Served:
    """What one app serves (the model, its facts, the page's files) and the CPU work of one request."""

    def __init__(self, path: Path, backend: str):
        self.engine = _open_model(path, backend)
        self.backend = backend
        self.facts = {
            **self.engine.facts,
            "classes": self.engine.classes,
            "backend": backend,
            "feature_maps": self.engine.has_features,
            "checkpoint": path.name,
        }
        self.pages = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in PAGES.items()}
        # Decoding a large upload holds up to ~320 MB (preprocess.MAX_PIXELS of RGBA, twice): one thread per
        # CPU for those bounds the memory by CPUs, not by anyio's 40 threads (16 uploads of 10 megapixels:
        # +173 MB instead of +1256 MB, in half the time). Smaller ones keep the shared threads: a queue of
        # their own would double the p99 of a mixed load.
        self.large_images = anyio.CapacityLimiter(_cpus())
        self.batcher = _Batcher(self.engine.probabilities)

    def prepared(self, asked: _Asked) -> tuple[np.ndarray, dict | None]:
        """The network's input, uint8 (28, 28), and how preprocessing made it if asked (PreprocessSteps)."""
        if asked.raw:
            return asked.source, None
        try:
            if not asked.steps:
                return preprocess(asked.source, asked.invert, name="upload"), None
            made = preprocess_steps(asked.source, asked.invert, name="upload")
        except LenetError as e:
            raise HTTPException(400, str(e)) from None
        image = made.pop("input")
        return image, {key: np.asarray(value).tolist() for key, value in made.items()}  # numpy -> JSON

    def result(self, asked: _Asked, image: np.ndarray, steps: dict | None, probabilities: list) -> dict:
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        result = {
            "digit": self.engine.classes[best],
            "index": best,
            "probabilities": probabilities,
            "classes": self.engine.classes,
            "input": image.tolist(),
            "features": None,
            "steps": steps,
        }
        notes = []
        if asked.features and self.engine.has_features:
            result["features"] = self.engine.features(image)
        elif asked.features:
            notes.append(f"feature maps are not available with the {self.backend} backend")
        if asked.steps and steps is None:
            notes.append("no steps: the pixels were taken as they are (preprocess: false)")
        if notes:
            result["note"] = "; ".join(notes)
        return result

    def answer(self, asked: _Asked) -> dict:
        """All the work of one POST /api/predict, in a worker thread: preprocess, predict, feature maps."""
        image, steps = self.prepared(asked)
        return self.result(asked, image, steps, self.engine.probabilities(image[None])[0])

    async def answer_here(self, asked: _Asked) -> dict:
        """The same on the event loop, the forward pass shared with the other requests ready now."""
        image, steps = self.prepared(asked)
        return self.result(asked, image, steps, await self.batcher.probabilities(image))

    def read(self, source: bytes | list, invert: str) -> dict:
        """All the work of one POST /api/read, in a worker thread: the number, each digit with its box."""
        try:
            found = read_number(source, self.engine.probabilities, invert, "upload", self.engine.classes)
        except NoNumberError as e:
            raise HTTPException(422, str(e)) from None
        except LenetError as e:
            raise HTTPException(400, str(e)) from None
        for digit in found["digits"]:
            digit["input"] = digit["input"].tolist()
        return found


# ---- the API ---------------------------------------------------------------------------------------------

# A grey level is what JSON Schema calls an integer: a whole number, 7.0 included, but not true or "7",
# which pydantic's int would take. So: a strict float that must be whole, documented as the integer it is.
GreyLevel = Annotated[
    float,
    Field(ge=0, le=255, multiple_of=1, strict=True),
    WithJsonSchema({"type": "integer", "maximum": 255, "minimum": 0}),
]
Pixels = Annotated[
    list[Annotated[list[GreyLevel], Field(min_length=28, max_length=28)]],
    Field(min_length=28, max_length=28),
]


class PixelsRequest(BaseModel):
    """A JSON body for POST /api/predict."""

    model_config = ConfigDict(extra="forbid", strict=True)  # booleans are true or false, not 0 or "yes"
    pixels: Pixels = Field(description="28 rows of 28 grey levels 0..255")
    preprocess: bool = Field(
        False,
        description="false: pixels are the network's input as they are (MNIST convention: white ink on "
        "black, digit centred in a 20x20 box); true: crop, fit and centre them as an uploaded image",
    )
    features: bool = Field(False, description="also return the conv feature maps")


class NumberPixelsRequest(BaseModel):
    """A JSON body for POST /api/read."""

    model_config = ConfigDict(extra="forbid", strict=True)
    pixels: list[Annotated[list[GreyLevel], Field(min_length=1)]] = Field(
        min_length=1,
        description="rows of grey levels 0..255, all of one length (any size within the body limit), read "
        "as an uploaded image is",
    )


class PreprocessSteps(BaseModel):
    """How preprocessing made the 28x28 input of an image (MNIST's way)."""

    size: list[int] = Field(description="[width, height] of the image")
    crop: list[int] = Field(description="[x0, y0, x1, y1]: the digit's extent in the image (x1, y1 excluded)")
    fitted: list[list[int]] = Field(
        description="20x20 grey levels: the crop scaled to fit 20x20 keeping its aspect ratio, centred in it"
    )
    fitted_box: list[int] = Field(description="[x0, y0, x1, y1]: where the scaled crop lies in fitted")
    centre_of_mass: list[float] = Field(description="[x, y]: the scaled crop's centre of mass in fitted")
    shift: list[int] = Field(
        description="[dx, dy]: where fitted's pixel (0, 0) lands in the 28x28 input, by whole pixels as in "
        "MNIST: centre_of_mass + shift is within half a pixel of (14, 14)"
    )


class PredictResponse(BaseModel):
    digit: str = Field(description="the most probable class")
    index: int = Field(description="its position in classes and probabilities")
    probabilities: list[float] = Field(description="one per class, summing to 1")
    classes: list[str]
    input: list[list[int]] = Field(description="the 28x28 uint8 image the network saw")
    features: dict[str, list[list[list[float]]]] | None = Field(
        None, description="on request: each conv layer's maps (maps, height, width), e.g. conv1, conv2"
    )
    steps: PreprocessSteps | None = Field(None, description="on request: how preprocessing made input")
    note: str | None = Field(None, description="why something requested (feature maps, steps) is missing")


class DigitRead(BaseModel):
    digit: str = Field(description="the most probable class")
    index: int = Field(description="its position in probabilities")
    probability: float = Field(description="its probability")
    probabilities: list[float] = Field(description="one per class, summing to 1")
    box: list[int] = Field(description="[x0, y0, x1, y1]: where it is in the image (x1, y1 exclusive)")
    input: list[list[int]] = Field(description="the 28x28 uint8 image of it that the network saw")


class ReadResponse(BaseModel):
    number: str = Field(description="the digits read, left to right")
    digits: list[DigitRead]
    width: int = Field(description="the image's width, in the pixels of the boxes")
    height: int


class ModelFacts(BaseModel):
    name: str | None
    parameters: int | None
    dataset: str | None
    test_accuracy: float | None
    epoch: int | None
    classes: list[str]
    normalization: dict[str, float]
    backend: str
    feature_maps: bool
    checkpoint: str


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


def _request_body(json_model: type[BaseModel]) -> dict:
    """A POST body as /openapi.json documents it: JSON as json_model, a multipart upload, or image bytes."""
    upload = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": json_model.model_json_schema()},
            "multipart/form-data": {"schema": {**upload, "required": ["file"]}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }


def _errors(unreadable: str, wrong_shape: str) -> dict[int | str, dict[str, Any]]:
    """The 4xx answers of a POST that takes an image, for /openapi.json."""
    return {
        status: {"model": ErrorResponse, "description": description}
        for status, description in (
            (400, unreadable),
            (413, f"body over {MAX_BODY_BYTES:,} bytes"),
            (415, "not an image, or an unsupported content type"),
            (422, wrong_shape),
        )
    }


PREDICT_ERRORS = _errors(
    "an image without a readable digit (blank, broken, a bomb) or bad JSON",
    "JSON or query parameters of the wrong shape",
)
READ_ERRORS = _errors(
    "an image that cannot be read (blank, broken, a bomb), or bad JSON",
    "an image holding no number (only specks or stray lines), or JSON or query parameters of the wrong shape",
)
Invert = Annotated[
    Literal["auto", "yes", "no"], Query(description="yes: dark ink on light paper; auto: detect")
]

router = APIRouter()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # closed before its body was all sent: a client's doing, not a bug; the answer goes nowhere
    return _error(400, "body: the client disconnected before sending all of it")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return _error(422, f"{where}: {first.get('msg')}")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal error (logged on the server)")


EXCEPTION_HANDLERS = {
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
    RequestValidationError: _validation_error,
    Exception: _unexpected,
}


def _json_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise HTTPException(400, f"body: not valid JSON ({first['msg']})") from None
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise HTTPException(422, f"{where}: {first['msg']}") from None


async def _body(request: Request, json_model: type[BaseModel]) -> bytes | BaseModel:
    """What a POST carries: image bytes (image/*, or a form's field `file`), or JSON as json_model."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _json_body(await request.body(), json_model)
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "file: a multipart upload needs the image in a file field 'file'")
        return await upload.read()
    if kind.startswith(IMAGE_TYPES):
        return await request.body()
    raise HTTPException(415, f"content type {kind or 'missing'}: send image/*, multipart/form-data or JSON")


def _pixel_count(source: bytes | np.ndarray | list) -> int:
    """The pixels of an image: from its header for encoded bytes (415 where no format is recognised)."""
    if not isinstance(source, bytes):
        return sum(len(row) for row in source)  # JSON rows
    pixels = _image_pixels(source)
    if pixels is None:
        raise HTTPException(415, "upload: not an image format this server reads (PNG, JPEG, GIF, ...)")
    return pixels


async def _in_thread(served: _Served, pixels: int, work: Any, *args: Any) -> dict:
    """work(*args) in a worker thread; for a large image, in one of the threads that decode one per CPU."""
    limiter = served.large_images if pixels > LARGE_PIXELS else None
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)


def _json(result: dict) -> Response:
    return Response(orjson.dumps(result), media_type="application/json")


@router.post(
    "/api/predict",
    response_model=PredictResponse,
    openapi_extra={"requestBody": _request_body(PixelsRequest)},
    responses=PREDICT_ERRORS,
)
async def predict(
    request: Request,
    features: Annotated[bool, Query(description="also return the conv feature maps")] = False,
    invert: Invert = "auto",
    steps: Annotated[bool, Query(description="also return how preprocessing made the input")] = False,
) -> Response:
    """The digit in an image: a multipart upload (field `file`), raw image bytes (`image/*`), or JSON
    `{"pixels": 28x28 grey levels, "preprocess": false, "features": false}`."""
    served: _Served = request.app.state.served
    body = await _body(request, PixelsRequest)
    if isinstance(body, PixelsRequest):
        grey = np.asarray(body.pixels, dtype=np.uint8)
        asked = _Asked(grey, invert, not body.preprocess, features or body.features, steps)
    else:
        asked = _Asked(body, invert, False, features, steps)
    pixels = _pixel_count(asked.source)
    # Small work (~1 ms) runs on the event loop: a worker thread's hand-offs cost more than they save
    # (lenet bench serve: 1.5x the requests/s, 2/3 the p99). Large images and feature maps go to a thread.
    if pixels <= INLINE_MAX_PIXELS and not asked.features:
        return _json(await served.answer_here(asked))
    return _json(await _in_thread(served, pixels, served.answer, asked))


@router.post(
    "/api/read",
    response_model=ReadResponse,
    openapi_extra={"requestBody": _request_body(NumberPixelsRequest)},
    responses=READ_ERRORS,
)
async def read(request: Request, invert: Invert = "auto") -> Response:
    """The handwritten number (one line of digits) in an image, sent as to /api/predict or as JSON
    `{"pixels": rows of grey levels}`: the number, and each digit's box, probabilities and 28x28 input."""
    served: _Served = request.app.state.served
    body = await _body(request, NumberPixelsRequest)
    source = body.pixels if isinstance(body, NumberPixelsRequest) else body
    # segmentation and the network's view of each candidate digit: several ms, so in a thread
    return _json(await _in_thread(served, _pixel_count(source), served.read, source, invert))


@router.get("/api/model", response_model=ModelFacts)
def model_facts(request: Request) -> dict:
    """What is being served: architecture, parameter count, dataset, test accuracy, classes."""
    return request.app.state.served.facts


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


def _page(route: str) -> Any:
    def serve_page(request: Request) -> Response:
        content, kind = request.app.state.served.pages[route]
        return Response(content, media_type=kind, headers=PAGE_HEADERS)

    return serve_page


for _route in PAGES:
    router.add_api_route(_route, _page(_route), methods=["GET"], include_in_schema=False)


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    return Response(status_code=204)


def create_app(checkpoint_path: str | Path, backend: str = "torch") -> Any:
    """The FastAPI app serving one checkpoint (or, with backend="onnxruntime", one .onnx export).

    The model is loaded here, once. Raises LenetError for a missing or unreadable file or a wrong backend.
    """
    served = _Served(Path(checkpoint_path), backend)
    app = FastAPI(
        title="lenet",
        version="1",
        description='Draw a digit and watch LeNet read it. Every error is JSON {"error": "..."}.',
        docs_url=None,  # Swagger UI and ReDoc load from a CDN
        redoc_url=None,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.served = served
    app.include_router(router)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    return app


class _BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, from its Content-Length or as it streams.

    Past the limit, reading the body raises HTTPException(413), which the app's handler turns into JSON.
    That answer goes out at once and closes the connection, but only after the rest of the body has been
    read and dropped (_discard): closing a socket with unread bytes makes the kernel reset the connection,
    and a client that sends its whole body before reading (urllib, most scripts) then sees the reset
    instead of the 413.
    """

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await _error(400, "bad Content-Length")(scope, receive, send)
        seen, refused = 0, False
        # a client waiting for "100 Continue" sends nothing more; a body too large to read is not read
        discard = (
            headers.get(b"expect", b"").lower() != b"100-continue" and int(declared or 0) <= DISCARD_BYTES
        )

        async def counted() -> dict:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                raise HTTPException(413, self._too_large())
            return message

        async def answer(message: dict) -> None:
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif refused and message["type"] == "http.response.body" and not message.get("more_body"):
                await send({**message, "more_body": True})  # the whole answer, as Content-Length says
                if discard:
                    await _discard(receive, seen)
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        if declared is not None and int(declared) > self.limit:
            refused = True
            return await _error(413, self._too_large())(scope, receive, answer)
        await self.app(scope, counted, answer)

    def _too_large(self) -> str:
        return f"body: more than {self.limit:,} bytes"


async def _discard(receive: Any, seen: int) -> None:
    """Read and drop the rest of a refused body: to its end, DISCARD_BYTES in all, or DISCARD_SECONDS."""
    with anyio.move_on_after(DISCARD_SECONDS):
        while seen <= DISCARD_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            seen += len(message.get("body", b""))


class _PairedWrites:
    """A transport that sends each write together with the next one, or alone once the event loop has run
    what was ready: uvicorn writes an answer's head and its body separately, and each send costs the server
    a system call and wakes the client once more."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            held, self._held = self._held, None
            self._transport.write(held + data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HttpProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools', or h11's without it), its writes paired (_PairedWrites)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(_PairedWrites(transport))


UVICORN_OPTIONS = {"http": _HttpProtocol, "log_level": "warning"}  # how `serve` runs uvicorn (and tests)


_WORKER_ENV = "LENET_SERVE_MODEL"  # how `serve` tells its worker processes what to load: JSON [path, backend]


def _worker_app() -> Any:
    """The app of one worker process of `serve(..., workers=N)` (uvicorn imports and calls this)."""
    import torch

    torch.set_num_threads(1)  # one image per call: more threads cost more in hand-offs than they save
    path, backend = json.loads(os.environ[_WORKER_ENV])
    app = create_app(path, backend)
    # torch, FastAPI and the model leave ~10^5 long-lived objects: frozen, the collector stops rescanning
    # them, which otherwise stalls every request in flight now and then (the p99 under load).
    gc.collect()
    gc.freeze()
    return app


def serve(
    checkpoint_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "torch",
    workers: int = 1,
) -> None:
    """Serve the page and API with uvicorn until interrupted (binds only this machine unless told).

    workers > 1 runs that many server processes on one port (uvicorn's supervisor; the kernel spreads the
    connections), each with its own copy of the model: up to workers times the requests/s on as many CPUs.
    """
    if workers < 1:
        raise LenetError(f"--workers: expected 1 or more, got {workers}")
    os.environ[_WORKER_ENV] = json.dumps([str(checkpoint_path), backend])
    if workers == 1:
        app = _worker_app()
    else:
        _open_model(Path(checkpoint_path), backend)  # a bad file fails here, once, not in every worker
        app = "lenet.serve:_worker_app"
    print(f"lenet: serving {checkpoint_path} on http://{host}:{port}/ ({workers} worker(s))", flush=True)
    uvicorn.run(app, factory=workers > 1, workers=workers, host=host, port=port, **UVICORN_OPTIONS)
