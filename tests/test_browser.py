"""The drawing page in real headless Chromium: draw with the mouse, read the answer off the page.

Uses the system's Chromium (Debian's `chromium` package); Playwright never downloads a browser here.
Set LENET_SCREENSHOT_DIR to keep a copy of the screenshots outside pytest's temporary folder.
"""

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture(scope="module")
def server_url(modern_checkpoint: Path) -> Iterator[str]:
    """The app under uvicorn in a thread, on 127.0.0.1 and a port the OS picks."""
    import uvicorn

    from lenet.serve import UVICORN_OPTIONS, create_app

    config = uvicorn.Config(create_app(modern_checkpoint), host="127.0.0.1", port=0, **UVICORN_OPTIONS)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str, **context_options):
    """A page on url that records console errors and refuses (and records) requests to any other origin."""
    page = browser.new_context(**context_options).new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def only_this_server(route) -> None:
        if route.request.url.startswith(url):
            route.continue_()
        else:
            problems.append(f"request to another origin: {route.request.url}")
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(url)
    # a locator wait, not wait_for_function: polling a JS string needs eval, which the page's CSP forbids
    page.locator("#model", has_text="parameters").wait_for()
    return page, problems


def stroke(page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through points given as fractions (x, y) of the drawing pad."""
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def shown_answer(page) -> tuple[str, list[float], list[float]]:
    """(digit, probabilities behind the bars, percentages as printed) once an answer is on the page."""
    page.wait_for_selector("#probabilities li.best")
    rows = page.locator("#probabilities li")
    probabilities = [float(rows.nth(i).get_attribute("data-probability")) for i in range(rows.count())]
    printed = [float(t.rstrip("%")) for t in page.locator("#probabilities .value").all_text_contents()]
    return page.locator("#digit").text_content(), probabilities, printed


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("LENET_SCREENSHOT_DIR"):
        keep = Path(os.environ["LENET_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / name)
    return path


def test_drawn_digits_are_read(browser, server_url: str, tmp_path: Path) -> None:
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    facts = page.locator("#model").text_content()
    assert "modern" in facts and "mnist" in facts and "test accuracy" in facts

    stroke(page, [(0.5, 0.15), (0.5, 0.85)])  # a 1: one vertical stroke
    digit, probabilities, printed = shown_answer(page)
    assert digit == "1"
    assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert sum(printed) == pytest.approx(100, abs=1.0)  # ten values rounded to 0.1%
    assert page.locator("#conv1 canvas").count() == 6
    assert page.locator("#conv2 canvas").count() == 16
    # the 28x28 input as the network saw it holds ink: white pixels on black
    ink = page.evaluate(
        "() => Array.from(document.querySelector('#input').getContext('2d')"
        ".getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 == 0 && v > 128).length"
    )
    assert 20 < ink < 300
    save_screenshot(page, tmp_path, "draw-1.png")

    page.click("#clear")
    assert page.locator("#digit").text_content() == "?"
    assert page.locator("#probabilities li.best").count() == 0
    stroke(page, [(0.22, 0.2), (0.78, 0.2), (0.42, 0.88)])  # a 7: top bar, then the diagonal
    digit, probabilities, _ = shown_answer(page)
    assert digit == "7"
    assert sum(probabilities) == pytest.approx(1, abs=1e-4)
    save_screenshot(page, tmp_path, "draw-7.png")
    assert problems == []


def test_errors_are_shown_in_the_page(browser, server_url: str, tmp_path: Path) -> None:
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    page.set_input_files("#upload", str(not_an_image))
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "not an image" in error.text_content()
    # the failed request shows as a console message by Chromium's design; nothing else may
    assert all("415" in p for p in problems), problems


def test_phone_viewport(browser, server_url: str, tmp_path: Path) -> None:
    page, problems = open_page(
        browser, server_url, viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True
    )
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # no sideways scrolling
    pad = page.locator("#pad").bounding_box()
    assert 300 <= pad["width"] <= 390 and abs(pad["width"] - pad["height"]) < 1
    stroke(page, [(0.5, 0.15), (0.5, 0.85)])
    digit, probabilities, _ = shown_answer(page)
    assert digit == "1" and sum(probabilities) == pytest.approx(1, abs=1e-4)
    save_screenshot(page, tmp_path, "phone.png")
    assert problems == []
