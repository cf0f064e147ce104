// Draw a digit or a number: the canvas goes to the server as PNG while drawing (debounced) and the moment
// the pen lifts, to POST /api/predict (digit mode) or POST /api/read (number mode). Each answer is built off
// the page and replaces the one shown in one step, tagged with the request it answers: in digit mode the
// digit, the ten probabilities, the 28x28 input, the feature maps and on request how the input was made; in
// number mode the number, and a box over the drawing for each digit with its reading. No libraries, no
// network beyond this server.
"use strict";

const DEBOUNCE_MS = 120;
const STROKE = 0.075; // pen width as a fraction of the canvas's shorter side (MNIST strokes: ~2 of 20 pixels)
const CLASSES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
const MARK = "#f2b134"; // what the show-work stages draw over images (boxes, centres of mass)

const main = document.getElementById("main");
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const errorBox = document.getElementById("error");
const spoken = document.getElementById("spoken");
const showWork = document.getElementById("show-work");
// every answer is built from a copy of an empty one
const emptyDigitAnswer = document.getElementById("answer").cloneNode(true);
const emptyNumberAnswer = document.getElementById("number-answer").content.firstElementChild;
const emptyMarks = document.getElementById("marks").cloneNode(false);

let inked = false; // anything on the canvas worth sending
let timer = null;
let strokes = 0; // strokes finished since the page loaded
let latest = 0; // id of the newest request: older answers arriving late are dropped
let inFlight = null;
let lastSent = null; // the body and content type of the newest request, to ask again (show work)
let facts = { feature_maps: true, backend: "" }; // from /api/model once it answers

// What the page asks and how it shows the answer, for each way of reading. render(answer or null, the
// drawing as it was sent or null) -> [a new #answer, a new #marks], both off the page.
const READINGS = {
  digit: {
    url: () => `api/predict?features=${facts.feature_maps}&steps=${showWork.checked}`,
    render: renderDigit,
    size: [280, 280],
    title: "Draw a digit",
    hint: "Draw one digit, large, in the middle. The network answers as you draw.",
  },
  number: {
    url: () => "api/read",
    render: renderNumber,
    size: [560, 280],
    title: "Draw a number",
    hint: "Write a number on one line, digits side by side. The network answers as you draw.",
  },
};
let reading = READINGS.digit;

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

window.addEventListener("error", (event) => showError(`Page error: ${event.message}`));
window.addEventListener("unhandledrejection", (event) => showError(`Page error: ${event.reason}`));

function blank() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

// Forgets the drawing and any answer on its way, and shows an empty answer.
function startOver() {
  clearTimeout(timer);
  latest += 1; // answers still on their way are for a drawing that is gone
  if (inFlight) inFlight.abort();
  lastSent = null;
  blank();
  show(...reading.render(null, null), 0, strokes, null);
  clearError();
}

function setMode(mode) {
  reading = READINGS[mode];
  main.dataset.mode = mode;
  [pad.width, pad.height] = reading.size;
  document.getElementById("title").textContent = reading.title;
  document.getElementById("hint").textContent = reading.hint;
  document.title = `LeNet: ${reading.title.toLowerCase()}`;
  startOver();
}

for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => setMode(radio.value));
}

// ---- drawing -------------------------------------------------------------------------------------------

function point(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) / box.width) * pad.width,
    y: ((event.clientY - box.top) / box.height) * pad.height,
  };
}

let last = null;

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  last = point(event);
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  ctx.lineWidth = STROKE * Math.min(pad.width, pad.height);
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(last.x + 0.01, last.y); // a tap leaves a dot
  ctx.stroke();
  inked = true;
  schedule();
});

pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  event.preventDefault();
  // pens and fast fingers deliver several positions per frame
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  }
  schedule();
});

function endStroke() {
  if (last === null) return;
  const penUp = performance.now();
  last = null;
  strokes += 1;
  pad.dataset.strokes = String(strokes);
  clearTimeout(timer);
  askAboutDrawing(penUp);
}

pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", startOver);

showWork.addEventListener("change", () => {
  if (lastSent) ask(lastSent.body, lastSent.contentType); // the drawing shown again, with or without steps
});

// ---- asking the server ---------------------------------------------------------------------------------

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(() => askAboutDrawing(null), DEBOUNCE_MS);
}

// penUp: performance.now() when the pen lifted, for the request sent then (the answer records how long after
// it it was shown); null while drawing.
function askAboutDrawing(penUp) {
  if (inked) ask(pngBytes(pad), "image/png", penUp);
}

// The canvas as PNG bytes, encoded now: toDataURL encodes at once, while toBlob's callback waits for the
// browser's idle time, long after the pen has lifted.
function pngBytes(canvas) {
  const text = atob(canvas.toDataURL("image/png").split(",", 2)[1]);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

// A copy of the pad as it is now (what the show-work stages draw the crop from).
function snapshot() {
  const copy = document.createElement("canvas");
  copy.width = pad.width;
  copy.height = pad.height;
  copy.getContext("2d").drawImage(pad, 0, 0);
  return copy;
}

async function ask(body, contentType, penUp = null) {
  const id = ++latest;
  const strokesSent = strokes;
  const asked = reading;
  const drawing = showWork.checked && asked === READINGS.digit ? snapshot() : null;
  lastSent = { body, contentType };
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  const init = { method: "POST", body, signal: controller.signal };
  if (contentType) init.headers = { "Content-Type": contentType };
  let response;
  try {
    response = await fetch(asked.url(), init);
  } catch (err) {
    if (err.name !== "AbortError") showError(`No answer from the server: ${err.message}`);
    return;
  }
  let answer;
  try {
    answer = await response.json();
  } catch (err) {
    if (id === latest && err.name !== "AbortError") {
      showError(`The server sent something that is not JSON (HTTP ${response.status})`);
    }
    return;
  }
  if (id !== latest) return;
  if (!response.ok) {
    showError(answer.error || `HTTP ${response.status}`);
    return;
  }
  clearError();
  show(...asked.render(answer, drawing), id, strokesSent, penUp);
}

// ---- showing the answer --------------------------------------------------------------------------------

// Puts view (a new #answer) and marks (a new #marks over the pad), not yet on the page, in the places of
// those shown, in one step, tagged with the request they answer (0: none) and the strokes finished when it
// was sent.
function show(view, marks, request, strokesSent, penUp) {
  for (const part of [view, marks]) {
    part.dataset.request = String(request);
    part.dataset.strokes = String(strokesSent);
  }
  document.getElementById("marks").replaceWith(marks);
  document.getElementById("answer").replaceWith(view);
  if (penUp !== null) view.dataset.msAfterPenUp = (performance.now() - penUp).toFixed(1);
  spoken.textContent = view.dataset.spoken || "";
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// Digit mode: a new #answer for a /api/predict answer (null: no answer yet), and an empty #marks.
function renderDigit(answer, drawing) {
  const view = emptyDigitAnswer.cloneNode(true);
  const part = (id) => view.querySelector(`#${id}`);
  const p = answer ? answer.probabilities : null;
  if (answer) {
    part("digit").textContent = answer.digit;
    part("confidence").textContent = `${percent(p[answer.index])} sure`;
    view.dataset.spoken = `It reads ${answer.digit}, ${percent(p[answer.index])} sure`;
  }
  const rows = answer ? bars(answer.classes, p, answer.index) : bars(CLASSES, null, -1);
  part("probabilities").replaceChildren(...rows);
  drawGrey(part("input"), answer ? answer.input : null);
  if (answer && answer.steps && drawing) renderWork(part, answer.steps, answer.input, drawing);
  if (answer && answer.features) {
    drawMaps(part("conv1"), answer.features.conv1);
    drawMaps(part("conv2"), answer.features.conv2);
  }
  part("features").hidden = !facts.feature_maps;
  const missing = `Feature maps are not available with the ${facts.backend} backend.`;
  const note = (answer && answer.note) || (facts.feature_maps ? "" : missing);
  part("features-note").textContent = note;
  part("features-note").hidden = !note;
  return [view, emptyMarks.cloneNode(false)];
}

// One row per class: its name, a bar and the percentage (all empty while probabilities is null).
function bars(classes, probabilities, best) {
  return classes.map((name, i) => {
    const p = probabilities ? probabilities[i] : 0;
    const li = document.createElement("li");
    li.dataset.class = name;
    li.dataset.probability = String(p);
    if (i === best) li.classList.add("best");
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = probabilities ? percent(p) : "";
    li.append(label, track, value);
    return li;
  });
}

// rows: 2-D array of numbers, shown as grey levels scaled so that `top` is white
function drawGrey(canvas, rows, top = 255) {
  const g = canvas.getContext("2d");
  if (!rows) {
    g.clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const h = rows.length;
  const w = rows[0].length;
  canvas.width = w;
  canvas.height = h;
  const image = g.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = Math.round((255 * Math.max(0, rows[y][x])) / (top || 1));
      const k = 4 * (y * w + x);
      image.data[k] = image.data[k + 1] = image.data[k + 2] = Math.min(255, v);
      image.data[k + 3] = 255;
    }
  }
  g.putImageData(image, 0, 0);
}

// maps: (count, h, w); each map is scaled by the layer's largest activation, so strengths compare
function drawMaps(box, maps) {
  const top = Math.max(...maps.map((m) => Math.max(...m.map((row) => Math.max(...row)))));
  const canvases = maps.map((m, i) => {
    const c = document.createElement("canvas");
    c.className = "pixels";
    c.title = `${box.id} map ${i + 1}`;
    drawGrey(c, m, top);
    return c;
  });
  box.replaceChildren(...canvases);
}

// ---- show work: how the drawing became the 28x28 input --------------------------------------------------

// Where an image of size [w, h] lies on the pad: uploads are drawn on it fitted and centred, drawings are
// the pad itself (scale 1). Maps the image's pixels to the pad's.
function onPad([w, h]) {
  const scale = Math.min(pad.width / w, pad.height / h);
  return { scale, dx: (pad.width - w * scale) / 2, dy: (pad.height - h * scale) / 2 };
}

// A box [x0, y0, x1, y1] in an image's pixels, in the pad's pixels (place: onPad of the image's size).
function boxOnPad(box, place) {
  return box.map((v, i) => v * place.scale + (i % 2 ? place.dy : place.dx));
}

// steps: /api/predict's `steps` (sizes and boxes in pixels, centre of mass [x, y] with pixel i's centre at
// i); input: the 28x28 input; drawing: the pad as it was sent.
function renderWork(part, steps, input, drawing) {
  const work = part("work");
  const [x0, y0, x1, y1] = steps.crop;
  const [cx, cy] = steps.centre_of_mass;
  const [sx, sy] = steps.shift;
  work.dataset.crop = steps.crop.join(",");
  work.dataset.centre = [cx + sx, cy + sy].map((v) => v.toFixed(2)).join(",");
  part("crop-size").textContent = `${x1 - x0}\u00d7${y1 - y0} of ${steps.size[0]}\u00d7${steps.size[1]} px`;
  part("shift").textContent = `(${sx}, ${sy})`;
  drawCrop(part("work-crop"), drawing, steps);
  const fit = drawPixels(part("work-fit"), steps.fitted);
  outline(fit, steps.fitted_box, part("work-fit").width / 20);
  cross(fit, cx, cy, part("work-fit").width / 20);
  const centre = drawPixels(part("work-centre"), input);
  const k = part("work-centre").width / 28;
  outline(centre, [sx, sy, sx + 20, sy + 20], k);
  centre.setLineDash([2, 3]);
  cross(centre, 14, 14, k, 28); // the middle of the field, across it
  centre.setLineDash([]);
  cross(centre, cx + sx, cy + sy, k);
  work.hidden = false;
}

// The drawing as sent, scaled to the stage, darkened outside the crop, the crop outlined.
function drawCrop(canvas, drawing, steps) {
  const g = canvas.getContext("2d");
  const k = Math.min(canvas.width / drawing.width, canvas.height / drawing.height);
  const [w, h] = [drawing.width * k, drawing.height * k];
  const [ox, oy] = [(canvas.width - w) / 2, (canvas.height - h) / 2];
  g.fillStyle = "#eef1f6";
  g.fillRect(0, 0, canvas.width, canvas.height);
  g.drawImage(drawing, ox, oy, w, h);
  const place = onPad(steps.size);
  const [x0, y0, x1, y1] = boxOnPad(steps.crop, place).map((v) => k * v);
  g.fillStyle = "rgba(29, 35, 48, 0.35)";
  g.beginPath();
  g.rect(0, 0, canvas.width, canvas.height);
  g.rect(ox + x0, oy + y0, x1 - x0, y1 - y0);
  g.fill("evenodd");
  g.strokeStyle = MARK;
  g.lineWidth = 2;
  g.strokeRect(ox + x0, oy + y0, x1 - x0, y1 - y0);
}

// rows (grey levels) drawn on the whole of canvas, each pixel a square; returns its context.
function drawPixels(canvas, rows) {
  const small = document.createElement("canvas");
  drawGrey(small, rows);
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(small, 0, 0, canvas.width, canvas.height);
  return g;
}

// [x0, y0, x1, y1] in pixels of k canvas units
function outline(g, [x0, y0, x1, y1], k) {
  g.strokeStyle = MARK;
  g.lineWidth = 1;
  g.strokeRect(x0 * k + 0.5, y0 * k + 0.5, (x1 - x0) * k - 1, (y1 - y0) * k - 1);
}

// a cross on the centre of pixel (x, y), `arm` pixels each way
function cross(g, x, y, k, arm = 1.5) {
  const [px, py] = [(x + 0.5) * k, (y + 0.5) * k];
  g.strokeStyle = MARK;
  g.lineWidth = 2;
  g.beginPath();
  g.moveTo(px - arm * k, py);
  g.lineTo(px + arm * k, py);
  g.moveTo(px, py - arm * k);
  g.lineTo(px, py + arm * k);
  g.stroke();
}

// ---- number mode -----------------------------------------------------------------------------------------

// A new #answer for a /api/read answer (null: none yet): the number and each digit as the network saw it;
// and a new #marks: a box over each digit on the pad, its reading under it.
function renderNumber(answer) {
  const view = emptyNumberAnswer.cloneNode(true);
  const marks = emptyMarks.cloneNode(false);
  if (!answer) return [view, marks];
  view.querySelector("#number").textContent = answer.number;
  view.dataset.spoken = `It reads ${answer.number}`;
  view.querySelector("#digits").replaceChildren(...answer.digits.map(digitSeen));
  const place = onPad([answer.width, answer.height]);
  marks.replaceChildren(...answer.digits.map((digit) => markOf(digit, place)));
  return [view, marks];
}

function digitSeen(digit) {
  const li = document.createElement("li");
  li.dataset.digit = digit.digit;
  li.dataset.probability = String(digit.probability);
  const input = document.createElement("canvas");
  input.className = "pixels";
  drawGrey(input, digit.input);
  const name = document.createElement("span");
  name.className = "digit";
  name.textContent = digit.digit;
  const sure = document.createElement("span");
  sure.className = "label";
  sure.textContent = percent(digit.probability);
  li.append(input, name, sure);
  return li;
}

// A box over one digit, placed in percentages of the pad; its label below it, or above where the box reaches
// the bottom, or inside where it fills the height, and right-aligned in the pad's right half, so that it
// stays on the pad.
function markOf(digit, place) {
  const [x0, y0, x1, y1] = boxOnPad(digit.box, place);
  const box = document.createElement("div");
  box.className = "mark";
  box.dataset.digit = digit.digit;
  box.dataset.probability = String(digit.probability);
  box.style.left = `${(100 * x0) / pad.width}%`;
  box.style.top = `${(100 * y0) / pad.height}%`;
  box.style.width = `${(100 * (x1 - x0)) / pad.width}%`;
  box.style.height = `${(100 * (y1 - y0)) / pad.height}%`;
  const label = document.createElement("span");
  label.className = "mark-label";
  label.textContent = `${digit.digit} ${percent(digit.probability)}`;
  if (y1 < 0.85 * pad.height) label.classList.add("below");
  else if (y0 > 0.15 * pad.height) label.classList.add("above");
  else label.classList.add("inside");
  if (x0 + x1 > pad.width) label.classList.add("right");
  box.append(label);
  return box;
}

// ---- uploads and model facts ---------------------------------------------------------------------------

document.getElementById("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = ""; // the same file can be chosen again
  if (!file) return;
  clearTimeout(timer);
  blank();
  try {
    // show it on the pad (fitted, centred) so that one can draw over it
    const bitmap = await createImageBitmap(file);
    const place = onPad([bitmap.width, bitmap.height]);
    const [w, h] = [bitmap.width * place.scale, bitmap.height * place.scale];
    ctx.drawImage(bitmap, place.dx, place.dy, w, h);
    inked = true;
  } catch (err) {
    // the browser cannot show it; the server still gets it and says what is wrong
  }
  const form = new FormData();
  form.append("file", file, file.name);
  ask(form, null);
});

async function loadFacts() {
  const out = document.getElementById("model");
  try {
    const response = await fetch("api/model");
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    facts = answer;
    const parts = [`${facts.name}`];
    if (facts.parameters !== null) parts.push(`${facts.parameters.toLocaleString("en")} parameters`);
    if (facts.dataset) parts.push(`trained on ${facts.dataset}`);
    if (facts.test_accuracy !== null) parts.push(`test accuracy ${(100 * facts.test_accuracy).toFixed(2)}%`);
    parts.push(`${facts.backend} backend`);
    out.textContent = parts.join(" · ");
    const shown = document.getElementById("answer");
    if (shown.dataset.request === "0") show(...reading.render(null, null), 0, strokes, null); // the facts' note
  } catch (err) {
    out.textContent = "";
    showError(`Could not read the model facts: ${err.message}`);
  }
}

// the browser may keep a choice from before a reload: the page starts in the mode the switch shows
setMode(document.querySelector('input[name="mode"]:checked').value);
loadFacts();
