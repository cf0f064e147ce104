"""`lenet serve` as it runs (uvicorn in its own process, on 127.0.0.1) under hostile clients over raw sockets:
bodies that trickle in or never end, bodies over the limit, many large uploads at once, and a soak of 32
clients mixing good and bad requests for 60 s. The server keeps answering and its memory stays bounded.
Clients that send a whole oversized body before reading (urllib, raw sockets) get their 413, and one that
never stops sending is cut off within the server's caps (uvicorn in a thread here, on port 0)."""

import asyncio
import io
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from served import uvicorn_in_a_thread

from lenet import bench, checkpoint, data

pytest.importorskip("uvicorn")

DIGITS = Path(__file__).parent / "digits"
CLASSES = list(data.DATASETS["mnist"].classes)
SOAK_SECONDS = 30
SOAK_CLIENTS = 32
SOAK_RSS_MARGIN_MB = 32  # server RSS may end this much above where it started (allocator slack)


def status_kb(pid: int, field: str) -> int:
    """A memory figure of a process from /proc, in kB: VmRSS (now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    """`python -m lenet serve` of a `modern` checkpoint with fresh weights, on a free port."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads server memory from /proc")
    with bench.served_modern() as (port, process, log):
        yield SimpleNamespace(port=port, pid=process.pid, log=log)
        assert process.poll() is None, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read()) == {"status": "ok"}
    except OSError:
        return False


def request(kind: str, body: bytes, framing: str | None = None) -> bytes:
    """POST /api/predict of `body`; framing: the header saying how long the body is, if not its length."""
    framing = framing if framing is not None else f"Content-Length: {len(body)}\r\n"
    head = f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n{framing}\r\n"
    return head.encode() + body


def exchange(port: int, raw: bytes, timeout: float = 30) -> tuple[int, dict]:
    """One request on a fresh connection: (status, JSON answer)."""

    async def run() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(bench._exchange(reader, writer, raw), timeout)
        finally:
            writer.close()

    status, answer = asyncio.run(run())
    return status, json.loads(answer)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def a_digit() -> bytes:
    return (DIGITS / "7_199_drawn-thick-clean-dark.png").read_bytes()


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer waiting on `sock` (the server closes or sets Content-Length)."""
    sock.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def test_slow_and_stalled_bodies_do_not_stop_the_server(server) -> None:
    """64 clients send headers and a few bytes of a body, then stall; another trickles a real digit in, a
    chunk every 0.2 s. Meanwhile every other request is answered as usual."""
    stalled = []
    for _ in range(64):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(request("image/png", b"\x89PNG", "Content-Length: 5000\r\n"))
        stalled.append(sock)
    trickle = socket.create_connection(("127.0.0.1", server.port))
    whole = request("image/png", a_digit())
    try:
        for start in range(0, len(whole), len(whole) // 10 + 1):
            trickle.sendall(whole[start : start + len(whole) // 10 + 1])
            started = time.monotonic()
            status, answer = exchange(server.port, request("image/png", a_digit()), timeout=10)
            assert status == 200 and answer["digit"] in CLASSES
            assert time.monotonic() - started < 5
            time.sleep(0.2)
        status, answer = read_response(trickle)
        assert status == 200 and answer["digit"] in CLASSES
    finally:
        trickle.close()
        for sock in stalled:
            sock.close()
    assert healthy(server.port)


def test_bodies_over_the_limit_are_refused_without_being_held(server) -> None:
    from lenet.serve import MAX_BODY_BYTES

    peak_before = status_kb(server.pid, "VmHWM")
    # a declared length far over the limit: refused before a byte of the body is sent
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request("image/png", b"", "Content-Length: 1000000000000\r\n"))
        status, answer = read_response(sock)
        assert status == 413 and "bytes" in answer["error"]
    # no declared length, 64 MiB streamed in chunks: refused once the limit is passed, the rest never read
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request("image/png", b"", "Transfer-Encoding: chunked\r\n"))
        chunk = b"%x\r\n" % (1 << 16) + bytes(1 << 16) + b"\r\n"
        sock.settimeout(10)
        try:
            for _ in range(1024):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server answered and stopped reading: what a client streaming without end should see
        status, answer = read_response(sock)
        assert status == 413 and "bytes" in answer["error"]
    assert (status_kb(server.pid, "VmHWM") - peak_before) / 1024 < 4 * MAX_BODY_BYTES / 2**20 + 8
    assert healthy(server.port)


def test_many_large_uploads_at_once_stay_within_bounded_memory(server) -> None:
    """8 concurrent 5.8-megapixel RGBA PNGs (23 MB each decoded): the server decodes them one thread per CPU
    at a time, so its peak memory grows by that many decodes (two copies each), not 8. (Measured once with
    anyio's 40 threads instead, 16 uploads of 10 megapixels: +1256 MB and twice the time, against +173 MB.)"""
    uploads, side = 8, 2400
    blob = png(Image.new("RGBA", (side, side), (255, 255, 255, 255)))
    per_decode_mb = 2 * 4 * side * side / 2**20
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    peak_before = status_kb(server.pid, "VmHWM")

    async def upload() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            return await asyncio.wait_for(bench._exchange(reader, writer, request("image/png", blob)), 120)
        finally:
            writer.close()

    async def all_at_once() -> list:
        return await asyncio.gather(*(upload() for _ in range(uploads)))

    answers = asyncio.run(all_at_once())
    assert all(status == 400 and b"blank" in answer for status, answer in answers)
    grown_mb = (status_kb(server.pid, "VmHWM") - peak_before) / 1024
    assert grown_mb < min(cpus, uploads) * per_decode_mb + 64, f"peak RSS grew by {grown_mb:.0f} MB"
    assert healthy(server.port)


def soak_requests() -> tuple[list[bytes], list[str], list[int | None]]:
    """(bodies, content types, expected status: None for a good request, which must give 200 and a digit)."""
    good = [
        (path.read_bytes(), "image/" + path.suffix[1:].replace("jpg", "jpeg"))
        for path in sorted(DIGITS.iterdir())[::13]
    ]
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255
    good.append((json.dumps({"pixels": pixels.tolist()}).encode(), "application/json"))
    good.append((json.dumps({"pixels": pixels.tolist(), "preprocess": True}).encode(), "application/json"))
    rng = np.random.default_rng(0)
    digit = a_digit()
    bad = [
        (rng.bytes(2000), "image/png", 415),
        (digit[: len(digit) // 2], "image/png", 400),
        (png(Image.new("L", (60, 60), 255)), "image/png", 400),
        (b"hello", "text/plain", 415),
        (b'{"pixels": [[0, 1', "application/json", 400),
        (json.dumps({"pixels": [[0] * 28] * 27}).encode(), "application/json", 422),
        (json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(), "application/json", 422),
        (b'{"pixels": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),
        (
            b'--x\r\nContent-Disposition: form-data; name="image"\r\n\r\nhi\r\n--x--\r\n',
            "multipart/form-data; boundary=x",
            422,
        ),
    ]
    mixed = [(body, kind, None) for body, kind in good] + bad
    order = rng.permutation(len(mixed))
    return [mixed[i][0] for i in order], [mixed[i][1] for i in order], [mixed[i][2] for i in order]


@pytest.mark.slow
def test_soak_32_clients_for_half_a_minute(server) -> None:
    bodies, kinds, expected = soak_requests()
    outcomes: Counter = Counter()

    def right(index: int, status: int, answer: bytes) -> bool:
        reply = json.loads(answer)
        if expected[index] is None:
            ok = status == 200 and reply["digit"] in CLASSES and len(reply["probabilities"]) == 10
        else:
            ok = status == expected[index] and 400 <= status < 500 and "\n" not in reply["error"]
        outcomes["good" if expected[index] is None else "bad", "right" if ok else f"wrong {status}"] += 1
        return ok

    # warm-up: the server's worker threads and their allocator arenas come into being before "start"
    asyncio.run(bench._load(server.port, "POST", "/api/predict", bodies, None, SOAK_CLIENTS, 5, kinds))
    start_mb = status_kb(server.pid, "VmRSS") / 1024
    result = asyncio.run(
        bench._load(
            server.port, "POST", "/api/predict", bodies, None, SOAK_CLIENTS, SOAK_SECONDS, kinds, right
        )
    )
    end_mb = status_kb(server.pid, "VmRSS") / 1024
    latencies = np.array(result["latencies"]) * 1e3
    p50, p99 = np.percentile(latencies, [50, 99])
    rate = len(latencies) / result["seconds"]
    print(
        f"\nsoak: {len(latencies)} requests in {result['seconds']:.1f} s ({rate:.0f}/s) from {SOAK_CLIENTS}"
        f" clients; p50 {p50:.1f} ms, p99 {p99:.1f} ms; {dict(outcomes)};"
        f" server RSS {start_mb:.0f} MB -> {end_mb:.0f} MB"
    )
    assert result["errors"] == 0, dict(outcomes)
    assert outcomes["good", "right"] > 0 and outcomes["bad", "right"] > 0
    assert end_mb - start_mb < SOAK_RSS_MARGIN_MB
    assert healthy(server.port)


# ---- oversized bodies from clients that send before they read --------------------------------------------

OVERSIZED = 5_000_000


@pytest.fixture(scope="module")
def local_port() -> Iterator[int]:
    """The app (a `modern` checkpoint with fresh weights) under uvicorn in a thread, run as `lenet serve` runs
    it, on 127.0.0.1 and a port the OS picks."""
    import torch

    from lenet.models import build
    from lenet.serve import create_app

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "modern.safetensors"
        meta = {
            "model": {"name": "modern", "kwargs": {}},
            "normalization": {"mean": data.MNIST_MEAN, "std": data.MNIST_STD},
            "input_shape": [1, 28, 28],
            "dataset": "mnist",
            "classes": CLASSES,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            checkpoint.save(path, build("modern").eval(), meta)
        app = create_app(path)
    with uvicorn_in_a_thread(app) as port:
        yield port


def test_urllib_sees_the_413_of_an_oversized_upload(local_port: int) -> None:
    """urllib sends the whole body (and `Connection: close`) before it reads the answer."""
    for _ in range(3):
        post = urllib.request.Request(
            f"http://127.0.0.1:{local_port}/api/predict",
            data=bytes(OVERSIZED),
            headers={"Content-Type": "image/png"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=30)
        assert refused.value.code == 413 and "bytes" in json.loads(refused.value.read())["error"]
    assert healthy(local_port)


def test_a_socket_that_sends_a_whole_oversized_body_then_reads_gets_the_413(local_port: int) -> None:
    raw = request("image/png", bytes(OVERSIZED), f"Content-Length: {OVERSIZED}\r\nConnection: close\r\n")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", local_port)) as sock:
            sock.sendall(raw)  # all of it: a reset connection fails here or in the read
            status, answer = read_response(sock)
            assert status == 413 and "bytes" in answer["error"]
    assert healthy(local_port)


@pytest.mark.parametrize("pace", ["flat out", "trickle"])
def test_a_body_that_never_ends_is_cut_off_within_the_caps(local_port: int, pace: str) -> None:
    """A chunked body sent without end on a kept-alive connection, flat out (the byte cap stops it) or a few
    KB at a time (the time cap does): the 413 comes at once, the connection closes within DISCARD_SECONDS,
    and other clients are answered meanwhile."""
    from lenet.serve import DISCARD_SECONDS

    sock = socket.create_connection(("127.0.0.1", local_port))
    sock.sendall(request("image/png", b"", "Transfer-Encoding: chunked\r\n"))
    size, pause = (1 << 16, 0.0) if pace == "flat out" else (4096, 0.01)
    chunk = b"%x\r\n" % size + bytes(size) + b"\r\n"
    stopped = threading.Event()

    def send_forever() -> None:
        try:
            while not stopped.is_set():
                sock.sendall(chunk)
                time.sleep(pause)
        except OSError:
            pass  # cut off

    sender = threading.Thread(target=send_forever, daemon=True)
    sender.start()
    started = time.monotonic()
    try:
        status, answer = read_response(sock)
        assert status == 413 and "bytes" in answer["error"]
        assert healthy(local_port)
        sock.settimeout(DISCARD_SECONDS + 30)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # closed while bytes were still arriving: the kernel resets
        assert time.monotonic() - started < DISCARD_SECONDS + 30
    finally:
        stopped.set()
        sock.close()
        sender.join(timeout=10)
    assert healthy(local_port)


def test_a_client_waiting_for_100_continue_gets_the_413_at_once(local_port: int) -> None:
    """It sends no body until told to: the 413 comes instead of "100 Continue", and the connection closes
    without waiting for a body."""
    from lenet.serve import DISCARD_SECONDS

    with socket.create_connection(("127.0.0.1", local_port)) as sock:
        sock.sendall(request("image/png", b"", f"Content-Length: {OVERSIZED}\r\nExpect: 100-continue\r\n"))
        status, answer = read_response(sock)
        assert status == 413 and "bytes" in answer["error"]
        sock.settimeout(DISCARD_SECONDS / 2)
        assert sock.recv(1) == b""
