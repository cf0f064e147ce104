// Draw a digit: strokes on the canvas go to POST /api/predict as PNG (debounced while drawing);
// the answer fills the bars, the 28x28 input and the feature maps. No libraries, no network beyond this server.
"use strict";

const DEBOUNCE_MS = 120;
const STROKE = 0.075; // pen width as a fraction of the canvas side (MNIST strokes: ~2 of 20 pixels)

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const errorBox = document.getElementById("error");
const digitOut = document.getElementById("digit");
const confidenceOut = document.getElementById("confidence");
const bars = document.getElementById("probabilities");

let inked = false; // anything on the canvas worth sending
let timer = null;
let latest = 0; // id of the newest request: older answers arriving late are dropped
let inFlight = null;
let withFeatures = true;

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

function resetAnswer() {
  digitOut.textContent = "?";
  confidenceOut.textContent = "";
  buildBars(null, null);
  drawGrey(document.getElementById("input"), null);
  for (const id of ["conv1", "conv2"]) document.getElementById(id).replaceChildren();
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
  last = null;
  schedule(0);
}

pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearTimeout(timer);
  latest += 1; // answers still on their way are for a drawing that is gone
  blank();
  resetAnswer();
  clearError();
});

// ---- asking the server ---------------------------------------------------------------------------------

function schedule(delay = DEBOUNCE_MS) {
  clearTimeout(timer);
  timer = setTimeout(() => {
    if (inked) pad.toBlob((png) => ask(png, "image/png"), "image/png");
  }, delay);
}

async function ask(body, contentType) {
  const id = ++latest;
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  const init = { method: "POST", body, signal: controller.signal };
  if (contentType) init.headers = { "Content-Type": contentType };
  let response;
  try {
    response = await fetch(`api/predict?features=${withFeatures}`, init);
  } catch (err) {
    if (err.name !== "AbortError") showError(`No answer from the server: ${err.message}`);
    return;
  }
  let answer;
  try {
    answer = await response.json();
  } catch (err) {
    if (id === latest) showError(`The server sent something that is not JSON (HTTP ${response.status})`);
    return;
  }
  if (id !== latest) return;
  if (!response.ok) {
    showError(answer.error || `HTTP ${response.status}`);
    return;
  }
  clearError();
  show(answer);
}

// ---- showing the answer --------------------------------------------------------------------------------

function buildBars(classes, probabilities) {
  const rows = (classes || ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]).map((name, i) => {
    const p = probabilities ? probabilities[i] : 0;
    const li = document.createElement("li");
    li.dataset.class = name;
    li.dataset.probability = String(p);
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
  bars.replaceChildren(...rows);
}

function show(answer) {
  const p = answer.probabilities;
  digitOut.textContent = answer.digit;
  confidenceOut.textContent = `${(100 * p[answer.index]).toFixed(1)}% sure`;
  buildBars(answer.classes, p);
  bars.children[answer.index].classList.add("best");
  drawGrey(document.getElementById("input"), answer.input);
  const note = document.getElementById("features-note");
  if (answer.features) {
    drawMaps("conv1", answer.features.conv1);
    drawMaps("conv2", answer.features.conv2);
  }
  if (answer.note) {
    note.textContent = answer.note;
    note.hidden = false;
  }
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
function drawMaps(id, maps) {
  const box = document.getElementById(id);
  if (!maps) {
    box.replaceChildren();
    return;
  }
  const top = Math.max(...maps.map((m) => Math.max(...m.map((row) => Math.max(...row)))));
  const canvases = maps.map((m, i) => {
    const c = document.createElement("canvas");
    c.className = "pixels";
    c.title = `${id} map ${i + 1}`;
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
    const facts = await response.json();
    if (!response.ok) throw new Error(facts.error || `HTTP ${response.status}`);
    const parts = [`${facts.name}`];
    if (facts.parameters !== null) parts.push(`${facts.parameters.toLocaleString("en")} parameters`);
    if (facts.dataset) parts.push(`trained on ${facts.dataset}`);
    if (facts.test_accuracy !== null) parts.push(`test accuracy ${(100 * facts.test_accuracy).toFixed(2)}%`);
    parts.push(`${facts.backend} backend`);
    out.textContent = parts.join(" · ");
    withFeatures = facts.feature_maps;
    if (!facts.feature_maps) {
      document.getElementById("features").hidden = true;
      const note = document.getElementById("features-note");
      note.textContent = `Feature maps are not available with the ${facts.backend} backend.`;
      note.hidden = false;
    }
  } catch (err) {
    out.textContent = "";
    showError(`Could not read the model facts: ${err.message}`);
  }
}

blank();
resetAnswer();
loadFacts();
