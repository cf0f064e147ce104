// Draw a digit: the canvas goes to POST /api/predict as PNG while drawing (debounced) and the moment the pen
// lifts. Each answer (the digit, the ten probabilities, the 28x28 input, the feature maps) is built off the
// page and replaces the one shown in one step, tagged with the request it answers. No libraries, no network
// beyond this server.
"use strict";

const DEBOUNCE_MS = 120;
const STROKE = 0.075; // pen width as a fraction of the canvas side (MNIST strokes: ~2 of 20 pixels)
const CLASSES = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const errorBox = document.getElementById("error");
const spoken = document.getElementById("spoken");
const emptyAnswer = document.getElementById("answer").cloneNode(true); // every answer is built from a copy

let inked = false; // anything on the canvas worth sending
let timer = null;
let strokes = 0; // strokes finished since the page loaded
let latest = 0; // id of the newest request: older answers arriving late are dropped
let inFlight = null;
let facts = { feature_maps: true, backend: "" }; // from /api/model once it answers

// What the page asks and how it shows the answer: reading one digit. (Another way of reading would be
// another pair of these.)
const reading = {
  url: () => `api/predict?features=${facts.feature_maps}`,
  render: renderDigit,
};

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
  ctx.lineWidth = STROKE * pad.width;
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

document.getElementById("clear").addEventListener("click", () => {
  clearTimeout(timer);
  latest += 1; // answers still on their way are for a drawing that is gone
  if (inFlight) inFlight.abort();
  blank();
  show(reading.render(null), 0, strokes, null);
  clearError();
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

async function ask(body, contentType, penUp = null) {
  const id = ++latest;
  const strokesSent = strokes;
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  const init = { method: "POST", body, signal: controller.signal };
  if (contentType) init.headers = { "Content-Type": contentType };
  let response;
  try {
    response = await fetch(reading.url(), init);
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
  show(reading.render(answer), id, strokesSent, penUp);
}

// ---- showing the answer --------------------------------------------------------------------------------

// Puts view (a new #answer, not yet on the page) in the place of the one shown, in one step, tagged with
// the request it answers (0: none) and the strokes finished when that was sent.
function show(view, request, strokesSent, penUp) {
  view.dataset.request = String(request);
  view.dataset.strokes = String(strokesSent);
  document.getElementById("answer").replaceWith(view);
  if (penUp !== null) view.dataset.msAfterPenUp = (performance.now() - penUp).toFixed(1);
  const digit = view.querySelector("#digit").textContent;
  const sure = view.querySelector("#confidence").textContent;
  spoken.textContent = digit === "?" ? "" : `It reads ${digit}, ${sure}`;
}

// A new #answer for a /api/predict answer (null: no answer yet), off the page.
function renderDigit(answer) {
  const view = emptyAnswer.cloneNode(true);
  const part = (id) => view.querySelector(`#${id}`);
  const p = answer ? answer.probabilities : null;
  if (answer) {
    part("digit").textContent = answer.digit;
    part("confidence").textContent = `${(100 * p[answer.index]).toFixed(1)}% sure`;
  }
  const rows = answer ? bars(answer.classes, p, answer.index) : bars(CLASSES, null, -1);
  part("probabilities").replaceChildren(...rows);
  drawGrey(part("input"), answer ? answer.input : null);
  if (answer && answer.features) {
    drawMaps(part("conv1"), answer.features.conv1);
    drawMaps(part("conv2"), answer.features.conv2);
  }
  part("features").hidden = !facts.feature_maps;
  const missing = `Feature maps are not available with the ${facts.backend} backend.`;
  const note = (answer && answer.note) || (facts.feature_maps ? "" : missing);
  part("features-note").textContent = note;
  part("features-note").hidden = !note;
  return view;
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
    value.textContent = probabilities ? `${(100 * p).toFixed(1)}%` : "";
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
    const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
    const w = bitmap.width * scale;
    const h = bitmap.height * scale;
    ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
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
    if (shown.dataset.request === "0") show(reading.render(null), 0, strokes, null); // with the facts' note
  } catch (err) {
    out.textContent = "";
    showError(`Could not read the model facts: ${err.message}`);
  }
}

blank();
show(reading.render(null), 0, strokes, null);
loadFacts();
