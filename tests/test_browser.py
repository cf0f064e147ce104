"""The drawing page in real headless Chromium: draw with the mouse, read the answer off the page.

The page tags the answer it shows (#answer) with the number of strokes finished when its request was sent,
and replaces it as a whole: a test waits for the answer to its last stroke, then reads all of that answer
at once. The answer records how long after the pen lifted it was shown.

Uses the system's Chromium (Debian's `chromium` package); Playwright never downloads a browser here.
Set LENET_SCREENSHOT_DIR to keep a copy of the screenshots outside pytest's temporary folder.
"""

import base64
import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
PEN_UP_TO_ANSWER_MS = 150  # one request of a few tens of ms, and the page's own work, with room to spare
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


def shown_answer(page, strokes: int) -> dict:
    """The answer to the request sent when stroke number `strokes` (since the page loaded) ended, once it is
    on the page, read in one go: digit, probabilities behind the bars, percentages as printed, the number of
    feature maps drawn, ms from the pen lifting to the answer being shown."""
    answer = page.locator(f'#answer[data-strokes="{strokes}"]')
    answer.wait_for()  # a locator wait, which the page's CSP allows
    return answer.evaluate(
        """(answer) => {
          const rows = [...answer.querySelectorAll("#probabilities li")];
          const rgba = answer.querySelector("#input").getContext("2d").getImageData(0, 0, 28, 28).data;
          const grey = Array.from(rgba).filter((v, i) => i % 4 === 0);
          return {
            request: Number(answer.dataset.request),
            digit: answer.querySelector("#digit").textContent,
            probabilities: rows.map((li) => Number(li.dataset.probability)),
            printed: rows.map((li) => parseFloat(li.querySelector(".value").textContent)),
            best: rows.filter((li) => li.classList.contains("best")).length,
            input: Array.from({length: 28}, (_, y) => grey.slice(28 * y, 28 * (y + 1))),
            conv1: answer.querySelectorAll("#conv1 canvas").length,
            conv2: answer.querySelectorAll("#conv2 canvas").length,
            msAfterPenUp: Number(answer.dataset.msAfterPenUp),
          };
        }"""
    )


def assert_read(answer: dict, digit: str) -> None:
    assert answer["digit"] == digit, answer
    assert len(answer["probabilities"]) == 10 and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert sum(answer["printed"]) == pytest.approx(100, abs=1.0)  # ten values rounded to 0.1%
    assert answer["best"] == 1
    assert 0 < answer["msAfterPenUp"] <= PEN_UP_TO_ANSWER_MS, answer["msAfterPenUp"]
    print(f"{digit}: shown {answer['msAfterPenUp']} ms after the pen lifted")


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
    one = shown_answer(page, strokes=1)
    assert_read(one, "1")
    assert (one["conv1"], one["conv2"]) == (6, 16)
    # the 28x28 input as the network saw it holds ink: white pixels on black
    assert 20 < sum(v > 128 for row in one["input"] for v in row) < 300
    save_screenshot(page, tmp_path, "draw-1.png")

    page.click("#clear")
    assert page.locator("#digit").text_content() == "?"
    assert page.locator("#probabilities li.best").count() == 0
    stroke(page, [(0.22, 0.2), (0.78, 0.2), (0.42, 0.88)])  # a 7: top bar, then the diagonal
    seven = shown_answer(page, strokes=2)
    assert_read(seven, "7")
    assert seven["request"] > one["request"]
    save_screenshot(page, tmp_path, "draw-7.png")
    assert problems == []


def test_the_answer_shown_is_to_the_drawing_as_it_ends(browser, server_url: str) -> None:
    """Strokes drawn one after another without a pause (requests overtaken by newer ones, answers arriving
    while the next stroke is drawn): what is shown at the end is the server's answer to the final drawing."""
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    strokes = [
        [(0.3, 0.15), (0.25, 0.55), (0.75, 0.55)],  # a 4: the open side and the bar
        [(0.6, 0.2), (0.6, 0.9)],  # its stem
        [(0.62, 0.3), (0.58, 0.7)],  # the stem again, a little thicker
    ]
    for points in strokes:
        stroke(page, points)
    answer = shown_answer(page, strokes=len(strokes))
    drawing = page.evaluate("() => document.querySelector('#pad').toDataURL('image/png')")
    post = urllib.request.Request(
        f"{server_url}api/predict",
        data=base64.b64decode(drawing.split(",", 1)[1]),
        headers={"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(post, timeout=30) as response:
        expected = json.loads(response.read())
    assert answer["input"] == expected["input"]
    assert answer["digit"] == expected["digit"]
    assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert 0 < answer["msAfterPenUp"] <= PEN_UP_TO_ANSWER_MS, answer["msAfterPenUp"]
    print(f"{answer['digit']}: shown {answer['msAfterPenUp']} ms after the pen lifted")
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
    assert_read(shown_answer(page, strokes=1), "1")
    save_screenshot(page, tmp_path, "phone.png")
    assert problems == []
