"""An app under uvicorn in a thread of the test process, run as `lenet serve` runs it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def uvicorn_in_a_thread(app: Any, timeout: float = 30) -> Iterator[int]:
    """Serves app on 127.0.0.1 at a port the OS picks, which it yields; stops it on leaving."""
    import uvicorn

    from lenet.serve import UVICORN_OPTIONS

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **UVICORN_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
