"""The drawing page in real headless Chromium: draw with the mouse or a finger, read the answer off the page.

The page tags the answer it shows (#answer, and #marks over the pad) with the number of strokes finished
when its request was sent, and replaces it as a whole: a test waits for the answer to its last stroke, then
reads all of that answer at once. The answer records how long after the pen lifted it was shown; one test
times that over many strokes, the others check only that the time was recorded.

Uses the system's Chromium (Debian's `chromium` package); Playwright never downloads a browser here.
Set LENET_SCREENSHOT_DIR to keep a copy of the screenshots outside pytest's temporary folder.
"""

import base64
import contextlib
import json
import math
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from served import uvicorn_in_a_thread

CHROMIUM = "/usr/bin/chromium"
PEN_UP_TO_ANSWER_MS = 150  # one request of a few tens of ms, and the page's own work, with room to spare
TIMED_STROKES = 9  # strokes timed one at a time; their median is held to PEN_UP_TO_ANSWER_MS
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
    from lenet.serve import create_app

    with uvicorn_in_a_thread(create_app(modern_checkpoint)) as port:
        url = f"http://127.0.0.1:{port}/"
        # one request per route first: the pen-up timings measure a running server, not its first forward
        # pass, thread start or lazy imports
        blank = json.dumps({"pixels": [[0] * 28] * 27 + [[0] * 13 + [255] * 2 + [0] * 13]}).encode()
        for route in ("api/predict", "api/read"):
            post = urllib.request.Request(
                url + route, data=blank, headers={"Content-Type": "application/json"}
            )
            with contextlib.suppress(urllib.error.HTTPError):  # a refusal warms the same path
                urllib.request.urlopen(post, timeout=60).close()
        yield url


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


def server_answer_to_pad(page, url: str) -> dict:
    """The server's JSON answer when what the drawing pad holds now is POSTed to url as PNG."""
    drawing = page.evaluate("() => document.querySelector('#pad').toDataURL('image/png')")
    post = urllib.request.Request(
        url, data=base64.b64decode(drawing.split(",", 1)[1]), headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(post, timeout=30) as response:
        return json.loads(response.read())


def assert_read(answer: dict, digit: str) -> None:
    assert answer["digit"] == digit, answer
    assert len(answer["probabilities"]) == 10 and sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert sum(answer["printed"]) == pytest.approx(100, abs=1.0)  # ten values rounded to 0.1%
    assert answer["best"] == 1
    assert answer["msAfterPenUp"] > 0  # an answer to a stroke, timed from its pen-up


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
    expected = server_answer_to_pad(page, f"{server_url}api/predict")
    assert answer["input"] == expected["input"]
    assert answer["digit"] == expected["digit"]
    assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert answer["msAfterPenUp"] > 0
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


# ---- number mode and show work -----------------------------------------------------------------------------


def finger_stroke(page, points: list[tuple[float, float]]) -> None:
    """One stroke of a finger on a touch screen (touch events, which the page gets as pointer events of type
    "touch") through points given as fractions (x, y) of the drawing pad."""
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    touch = page.context.new_cdp_session(page)
    path = [xy[0]]
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        path += [(x0 + (x1 - x0) * k / 8, y0 + (y1 - y0) * k / 8) for k in range(1, 9)]
    kinds = ["touchStart"] + ["touchMove"] * (len(path) - 1)
    for kind, (x, y) in zip(kinds, path, strict=True):
        touch.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    touch.detach()


def in_cell(k: int, points: list[tuple[float, float]], cells: int = 3) -> list[tuple[float, float]]:
    """Points (u, v) of a digit drawn in a square, placed in the k-th of `cells` squares side by side along
    the 2:1 number pad, each 0.8 of its height."""
    side = 0.8 * 0.5  # the square's side as a fraction of the pad's width
    cx = (k + 0.5) / cells
    return [(cx + (u - 0.5) * side, 0.5 + (v - 0.5) * 0.8) for u, v in points]


def oval(steps: int = 16) -> list[tuple[float, float]]:
    """A 0: an upright oval from its top, round and closed."""
    angles = [2 * math.pi * t / steps for t in range(steps + 1)]
    return [(0.5 + 0.22 * math.sin(a), 0.5 - 0.36 * math.cos(a)) for a in angles]


# "407": the 4 in two strokes, then the 0 and the 7, as fractions of the pad
NUMBER_407 = [
    in_cell(0, [(0.35, 0.15), (0.25, 0.6), (0.78, 0.6)]),
    in_cell(0, [(0.62, 0.25), (0.62, 0.9)]),
    in_cell(1, oval()),
    in_cell(2, [(0.22, 0.15), (0.78, 0.15), (0.42, 0.88)]),
]


def switch_to(page, mode: str) -> None:
    page.locator(".modes label", has_text=mode).click()
    page.locator(f'main[data-mode="{mode}"]').wait_for(state="attached")


def shown_number(page, strokes: int) -> dict:
    """The number mode's answer to the request sent when stroke number `strokes` ended, read in one go once
    it is on the page: the number in large type, the digits listed under it, and the boxes over the pad
    (as fractions of the pad) with their labels and the request they answer."""
    answer = page.locator(f'#answer[data-strokes="{strokes}"]')
    answer.wait_for(state="attached")
    return answer.evaluate(
        """(answer) => {
          const pad = document.getElementById("pad").getBoundingClientRect();
          const marks = document.getElementById("marks");
          const fraction = (r) => [(r.left - pad.left) / pad.width, (r.top - pad.top) / pad.height,
                                   (r.right - pad.left) / pad.width, (r.bottom - pad.top) / pad.height];
          return {
            request: Number(answer.dataset.request),
            number: answer.querySelector("#number").textContent,
            numberPx: parseFloat(getComputedStyle(answer.querySelector("#number")).fontSize),
            listed: [...answer.querySelectorAll("#digits li")].map((li) => li.dataset.digit),
            marksRequest: Number(marks.dataset.request),
            marks: [...marks.querySelectorAll(".mark")].map((m) => ({
              digit: m.dataset.digit,
              probability: Number(m.dataset.probability),
              box: fraction(m.getBoundingClientRect()),
              label: m.querySelector(".mark-label").textContent,
              labelBox: fraction(m.querySelector(".mark-label").getBoundingClientRect()),
            })),
            msAfterPenUp: Number(answer.dataset.msAfterPenUp),
          };
        }"""
    )


def draw_407_and_read(page, draw: Callable) -> dict:
    strokes_before = int(page.locator("#pad").get_attribute("data-strokes"))
    for points in NUMBER_407:
        draw(page, points)
    answer = shown_number(page, strokes_before + len(NUMBER_407))
    assert answer["number"] == "407", answer
    assert answer["listed"] == ["4", "0", "7"] and answer["numberPx"] >= 48  # large type
    assert answer["marksRequest"] == answer["request"]  # the boxes belong to the answer shown
    for k, mark in enumerate(answer["marks"]):
        x0, y0, x1, y1 = mark["box"]
        cell = (k / 3, (k + 1) / 3)
        assert cell[0] - 0.02 <= x0 < x1 <= cell[1] + 0.02 and 0 <= y0 < y1 <= 1, mark  # over its strokes
        assert mark["label"] == f"{mark['digit']} {100 * mark['probability']:.1f}%"
        lx0, ly0, lx1, ly1 = mark["labelBox"]
        assert lx0 >= 0 and ly0 >= 0 and lx1 <= 1 and ly1 <= 1, mark  # on the pad
    assert [mark["digit"] for mark in answer["marks"]] == ["4", "0", "7"]
    assert answer["msAfterPenUp"] > 0
    return answer


def test_a_drawn_number_is_read(browser, server_url: str, tmp_path: Path) -> None:
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    switch_to(page, "number")
    pad = page.locator("#pad").bounding_box()
    assert pad["width"] > 1.9 * pad["height"] and page.locator("#title").text_content() == "Draw a number"
    answer = draw_407_and_read(page, stroke)
    save_screenshot(page, tmp_path, "number.png")

    # what is shown is the server's answer to the final drawing
    expected = server_answer_to_pad(page, f"{server_url}api/read")
    assert expected["number"] == answer["number"]
    for mark, digit in zip(answer["marks"], expected["digits"], strict=True):
        x0, y0, x1, y1 = digit["box"]
        box = [
            x0 / expected["width"],
            y0 / expected["height"],
            x1 / expected["width"],
            y1 / expected["height"],
        ]
        assert mark["box"] == pytest.approx(box, abs=0.01)  # within the pad's border of 2 px

    # back to digit mode: the boxes go with the number
    switch_to(page, "digit")
    assert page.locator("#marks .mark").count() == 0 and page.locator("#digit").text_content() == "?"
    assert problems == []


def test_show_work_for_an_off_centre_digit(browser, server_url: str, tmp_path: Path) -> None:
    """A 1 drawn near the left edge: the crop is on the left of the drawing, the 20x20 fit and the 28x28 input
    are drawn, and the centre of mass lands in the middle of the input, so it reads as a centred 1 would."""
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    page.check("#show-work")
    stroke(page, [(0.2, 0.2), (0.22, 0.8)])
    answer = page.locator('#answer[data-strokes="1"]')
    answer.wait_for(state="attached")
    work = answer.evaluate(
        """(answer) => {
          const work = answer.querySelector("#work");
          const stages = [...work.querySelectorAll("canvas.stage")].map((c) => {
            const rgba = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const levels = new Set(Array.from(rgba).filter((v, i) => i % 4 === 0));
            return {id: c.id, levels: levels.size, shown: c.getBoundingClientRect().width};
          });
          return {
            hidden: work.hidden,
            digit: answer.querySelector("#digit").textContent,
            crop: work.dataset.crop.split(",").map(Number),
            centre: work.dataset.centre.split(",").map(Number),
            stages,
            text: work.textContent,
            msAfterPenUp: Number(answer.dataset.msAfterPenUp),
          };
        }"""
    )
    assert not work["hidden"] and work["digit"] == "1"
    assert [stage["id"] for stage in work["stages"]] == ["work-crop", "work-fit", "work-centre"]
    assert all(stage["levels"] > 2 and stage["shown"] > 100 for stage in work["stages"]), work["stages"]
    x0, y0, x1, y1 = work["crop"]
    assert x1 < 0.4 * 280 and 0.1 * 280 < y0 < y1 < 0.9 * 280  # on the left of the 280x280 drawing
    assert work["centre"] == pytest.approx([14, 14], abs=0.5)  # MNIST: moved by whole pixels
    assert "20×20" in work["text"] and "28×28" in work["text"]
    assert work["msAfterPenUp"] > 0
    save_screenshot(page, tmp_path, "show-work.png")

    page.uncheck("#show-work")  # asks again without the steps
    page.locator('#answer[data-strokes="1"] #work[hidden]').wait_for(state="attached")
    assert problems == []


def test_a_number_written_with_a_finger_on_a_phone(browser, server_url: str, tmp_path: Path) -> None:
    page, problems = open_page(
        browser, server_url, viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True
    )
    switch_to(page, "number")
    pad = page.locator("#pad").bounding_box()
    assert 300 <= pad["width"] <= 390 and abs(pad["width"] - 2 * pad["height"]) < 2
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # no sideways scrolling
    draw_407_and_read(page, finger_stroke)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # nor with the boxes drawn
    save_screenshot(page, tmp_path, "phone-number.png")
    assert problems == []


# ---- how soon the answer follows the pen -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["digit", "number", "show work"])
def test_the_answer_is_shown_soon_after_the_pen_lifts(browser, server_url: str, mode: str) -> None:
    """Pen up to answer shown, as the page measures it, for TIMED_STROKES strokes drawn one at a time (each
    answer waited for, then the pad cleared). One stroke's time says as much about what else the machine
    was doing at that moment as about the page, so their median is held to the limit, and each is printed.
    An asynchronous PNG encode (canvas.toBlob) would put every one of them past a second."""
    page, problems = open_page(browser, server_url, viewport={"width": 1100, "height": 900})
    if mode == "number":
        switch_to(page, "number")
    if mode == "show work":
        page.check("#show-work")
    times = []
    for k in range(1, TIMED_STROKES + 1):
        stroke(page, [(0.45, 0.15), (0.5, 0.85)])
        answer = page.locator(f'#answer[data-strokes="{k}"][data-ms-after-pen-up]')
        answer.wait_for(state="attached")
        times.append(float(answer.get_attribute("data-ms-after-pen-up")))
        page.click("#clear")
    print(f"{mode}: shown {', '.join(f'{t:.0f}' for t in times)} ms after the pen lifted")
    assert sorted(times)[TIMED_STROKES // 2] <= PEN_UP_TO_ANSWER_MS, times
    assert problems == []
