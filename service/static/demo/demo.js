// normserve demo page. Plain JavaScript; talks to this server's own API only:
//   GET  /v2/health/ready              which models there are, and their state
//   GET  /v2/models/{m}                each model's inputs, outputs, labels, norm layers and batch statistics
//   POST /v2/models/{m}/infer          the prediction of every served digit model (running statistics)
//   POST /v2/models/{m}/batchnorm      one batch through a model with a batch-statistics graph, with running and
//                                      with batch statistics: digits for a digit model, a seeded random batch
//                                      of its declared inputs for any other
// and GET /demo/digits.json, the held-out test split (pixels 0..16).
// A digit model takes one FP32 input of shape [-1, 1, 8, 8] and gives a 10-class 2-D output: only those use the
// drawing; every other model is shown by its metadata.
"use strict";

const SIDE = 8; // the models' input is 8x8, one channel
const CELLS = SIDE * SIDE;
const DIGIT_SHAPE = JSON.stringify([-1, 1, SIDE, SIDE]);
const DIGIT_CLASSES = 10;
const RANDOM_ROWS = 8; // the rows of a random batch, at first (at most the model's max batch size)
const INTEGER_TYPE = /^U?INT/;
const DEBOUNCE_MS = 150; // after a stroke ends or a key edits the grid
const READY_RETRY_MS = 3000;
const BRUSH = 30; // stroke width in canvas pixels (280 wide): about one of the 8 blocks
const INK = [20, 24, 30]; // rgb of the ink; the canvas alpha channel is the value
const ADD = 4; // companions added per click
const SHIFT = 0.4; // brightness shift of the shifted companions: min(1, x + SHIFT)
const BN_TYPE = /^(Token)?BatchNorm/;
const SWITCHABLE_TYPE = /^SwitchableNorm/;

const $ = (selector) => document.querySelector(selector);

const state = {
  digits: null, // {images: [Float32Array(64)], targets: [int]}
  models: new Map(), // name -> {name, version, state, reason, provider, meta, metaError}
  pixels: new Float32Array(CELLS), // the current input, row-major, values in [0, 1]
  source: { kind: "empty" }, // "empty" | "drawing" | "edited" | {kind: "sample", index, label}
  input: 0, // counts changes of the input; results carry the count they answer
  predictions: new Map(), // model -> predicted class index of the current input (from /infer)
  companions: [], // {pixels, label, index, kind}
  bnModel: null,
  cursor: 27, // the highlighted cell of the 8x8 grid
};

const byName = (a, b) => a.name.localeCompare(b.name);

// ---------------------------------------------------------------------------------------------
// The API

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    return { ok: false, status: 0, data: { error: `the server cannot be reached (${e.message})` } };
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { ok: response.ok, status: response.status, data };
}

function errorText(result) {
  return (result.data && result.data.error) || `HTTP ${result.status} without an error message`;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function softmax(logits) {
  const top = Math.max(...logits);
  const exp = logits.map((z) => Math.exp(z - top));
  const sum = exp.reduce((a, b) => a + b, 0);
  return exp.map((e) => e / sum);
}

function argmax(values) {
  return values.reduce((best, v, i) => (v > values[best] ? i : best), 0);
}

function percent(p) {
  return p < 0.001 ? "<0.1%" : `${(p * 100).toFixed(1)}%`;
}

function normText(normLayers) {
  const entries = Object.entries(normLayers || {});
  if (!entries.length) return "no norm layers";
  return entries.map(([type, n]) => (n > 1 ? `${type} ×${n}` : type)).join(", ");
}

function hasBatchNorm(meta) {
  return Object.keys(meta.norm_layers || {}).some((type) => BN_TYPE.test(type));
}

// Whether the batchnorm endpoint serves the model: the metadata says (with the reason when it does not).
function hasBatchStats(meta) {
  return meta.batch_statistics ? meta.batch_statistics.available : hasBatchNorm(meta);
}

// The model's 10-class 2-D output (rows, classes), if it has one.
function digitOutput(meta) {
  return meta.outputs.find((o) => o.shape.length === 2 && o.shape[0] === -1 && o.shape[1] === DIGIT_CLASSES);
}

function isDigitModel(meta) {
  const [input] = meta.inputs;
  return meta.inputs.length === 1 && input.datatype === "FP32" && JSON.stringify(input.shape) === DIGIT_SHAPE && Boolean(digitOutput(meta));
}

function shapeText(shape) {
  return `[${shape.join(", ")}]`;
}

function tensorsText(tensors) {
  return tensors.map((t) => `${t.name} ${t.datatype} ${shapeText(t.shape)}`).join(", ");
}

function labelOf(name, index) {
  const meta = state.models.get(name)?.meta;
  return meta?.labels?.[index] ?? String(index);
}

function inkColor(v) {
  const mix = (c) => Math.round(255 + (c - 255) * Math.min(1, Math.max(0, v)));
  return `rgb(${mix(INK[0])}, ${mix(INK[1])}, ${mix(INK[2])})`;
}

function paintThumb(canvas, pixels) {
  canvas.width = SIDE;
  canvas.height = SIDE;
  const ctx = canvas.getContext("2d");
  pixels.forEach((v, i) => {
    ctx.fillStyle = inkColor(v);
    ctx.fillRect(i % SIDE, Math.floor(i / SIDE), 1, 1);
  });
  return canvas;
}

function randomItem(items) {
  return items[Math.floor(Math.random() * items.length)];
}

function shuffled(items) {
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [copy[i], copy[j]] = [copy[j], copy[i]];
  }
  return copy;
}

function debounce(fn, ms) {
  let timer = null;
  const run = () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
  run.cancel = () => clearTimeout(timer);
  return run;
}

// ---------------------------------------------------------------------------------------------
// Models: readiness, then each model's metadata; retried until every model is ready

function digitModels() {
  return [...state.models.values()].filter((m) => m.state === "READY" && m.meta && isDigitModel(m.meta));
}

async function refreshModels() {
  const result = await api("/v2/health/ready");
  const body = result.data;
  const status = $("#server-status");
  if (!body || !Array.isArray(body.models)) {
    status.textContent = `server: ${errorText(result)}`;
    status.className = "pill bad";
    setTimeout(refreshModels, READY_RETRY_MS);
    return;
  }
  const seen = new Map();
  for (const v of body.models) {
    const known = seen.get(v.name);
    if (!known || (v.state === "READY" && known.state !== "READY")) seen.set(v.name, v);
  }
  for (const [name, v] of seen) {
    const model = state.models.get(name) || { name };
    Object.assign(model, { version: v.version, state: v.state, reason: v.reason || "", provider: v.provider });
    state.models.set(name, model);
  }
  for (const name of [...state.models.keys()]) if (!seen.has(name)) state.models.delete(name);
  await Promise.all(
    [...state.models.values()]
      .filter((m) => m.state === "READY" && !m.meta)
      .map(async (m) => {
        const meta = await api(`/v2/models/${encodeURIComponent(m.name)}`);
        if (meta.ok) m.meta = meta.data;
        else m.metaError = errorText(meta);
      }),
  );
  const waiting = [...state.models.values()].filter((m) => m.state !== "READY" || !m.meta).map((m) => m.name);
  if (body.ready && !waiting.length) {
    status.textContent = "server ready";
    status.className = "pill ok";
  } else {
    const why = body.ready ? `server ready; not ready: ${waiting.join(", ")}` : body.error || "server not ready";
    status.textContent = `${why}. Checking again every few seconds.`;
    status.className = "pill";
    setTimeout(refreshModels, READY_RETRY_MS);
  }
  renderModelList();
  renderOtherModels();
  renderDigitPanels();
  renderBnPicker();
  predictNow();
}

function renderModelList() {
  const list = $("#model-list");
  const items = [...state.models.values()].sort(byName);
  if (!items.length) {
    list.replaceChildren(el("li", { class: "muted", text: "The server serves no models (yet)." }));
    return;
  }
  list.replaceChildren(
    ...items.map((m) => {
      const li = el("li", { "data-model": m.name, "data-state": m.state }, el("span", { class: "name", text: m.name }));
      let detail;
      if (m.state !== "READY") {
        li.classList.add("waiting");
        detail = `${m.name} is not ready: ${m.state} ${m.reason}`.trim();
      } else if (!m.meta) {
        li.classList.add("waiting");
        detail = `metadata: ${m.metaError || "loading"}`;
      } else if (!isDigitModel(m.meta)) {
        li.classList.add("other");
        detail = `v${m.version} · not a digit model (inputs ${tensorsText(m.meta.inputs)}; outputs ${tensorsText(m.meta.outputs)})`;
        if (hasBatchStats(m.meta)) li.querySelector(".name").after(el("span", { class: "tag", text: "batch statistics" }));
      } else {
        const provider = m.meta.provider ? ` · ${m.meta.provider}` : "";
        detail = `v${m.version} · ${normText(m.meta.norm_layers)}${provider}`;
        if (hasBatchNorm(m.meta)) li.querySelector(".name").after(el("span", { class: "tag", text: "BatchNorm" }));
      }
      li.append(el("span", { class: "detail", text: detail }));
      if (m.meta?.description) li.title = m.meta.description;
      return li;
    }),
  );
}

// Every ready model that does not take digits, by its metadata: what it is, what it takes and gives.
function renderOtherModels() {
  const others = [...state.models.values()].filter((m) => m.state === "READY" && m.meta && !isDigitModel(m.meta)).sort(byName);
  $("#other-models").hidden = !others.length;
  const list = $("#other-model-list");
  const shown = JSON.stringify(others.map((m) => [m.name, m.version]));
  if (list.dataset.shown === shown) return; // the page checks again every few seconds: keep what is read
  list.dataset.shown = shown;
  list.replaceChildren(...others.map(metadataCard));
}

function metadataCard(model) {
  const meta = model.meta;
  const stats = meta.batch_statistics;
  const facts = [
    ["versions", meta.versions.join(", ")],
    ["batching", meta.max_batch_size
      ? `up to ${meta.max_batch_size} rows a batch (the -1 dimension is the rows)`
      : "no batch dimension (max_batch_size 0): every request has exactly these shapes, and runs alone"],
    ["norm layers", normText(meta.norm_layers)],
    ["labels", meta.labels?.length ? `${meta.labels.length}: ${meta.labels.slice(0, 10).join(", ")}${meta.labels.length > 10 ? ", …" : ""}` : "none"],
    ["runs on", meta.provider || "unknown"],
    ["batch statistics", stats?.available ? "a batch-statistics graph: the BatchNorm panel below takes a random batch"
      : hasBatchNorm(meta) && stats?.reason ? stats.reason : "none"],
  ];
  if (meta.input_description) facts.unshift(["input", meta.input_description]);
  const row = (kind, t) =>
    el("tr", {}, el("td", { text: kind }), el("td", { class: "mono", text: t.name }), el("td", { text: t.datatype }), el("td", { class: "mono", text: shapeText(t.shape) }));
  return el(
    "article",
    { class: "meta-card", "data-model": model.name },
    el("h3", { text: model.name }),
    el("p", { class: "muted", text: meta.description || "No description." }),
    el("dl", { class: "facts" }, ...facts.flatMap(([key, value]) => [el("dt", { text: key }), el("dd", { text: value })])),
    el(
      "div",
      { class: "layers-scroll" },
      el(
        "table",
        { class: "tensors" },
        el("thead", {}, el("tr", {}, ...["", "name", "datatype", "shape"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, ...meta.inputs.map((t) => row("input", t)), ...meta.outputs.map((t) => row("output", t))),
      ),
    ),
  );
}

// The drawing and the predictions are for digit models: hidden once the server is known to serve none.
function renderDigitPanels() {
  const models = [...state.models.values()];
  const settled = models.every((m) => m.state === "UNAVAILABLE" || (m.state === "READY" && m.meta));
  const digits = models.some((m) => m.state === "READY" && m.meta && isDigitModel(m.meta));
  $("#digit-panels").hidden = models.length > 0 && settled && !digits;
}

// ---------------------------------------------------------------------------------------------
// Held-out digits

async function loadDigits() {
  const result = await api("/demo/digits.json");
  if (!result.ok) {
    $("#input-source").textContent = `The held-out digits did not load: ${errorText(result)}`;
    return;
  }
  const scale = result.data.pixel_scale;
  state.digits = {
    images: result.data.images.map((image) => Float32Array.from(image, (v) => v / scale)),
    targets: result.data.targets,
  };
  for (const button of document.querySelectorAll("#digit-picker button, #random")) button.disabled = false;
  if (state.source.kind === "empty") loadSample(Math.floor(Math.random() * state.digits.targets.length));
}

function samplesOf(label, exclude = -1) {
  const found = [];
  state.digits.targets.forEach((t, i) => {
    if (t === label && i !== exclude) found.push(i);
  });
  return found;
}

function loadSample(index) {
  state.pixels = Float32Array.from(state.digits.images[index]);
  setSource({ kind: "sample", index, label: state.digits.targets[index] });
  paintCanvasFromPixels();
  inputChanged(true);
}

// ---------------------------------------------------------------------------------------------
// Input: the canvas, scaled to 8x8, and the 8x8 grid (keyboard editable)

const canvas = $("#canvas");
const ctx = canvas.getContext("2d", { willReadFrequently: true });
let stroke = null; // {id, x, y} while a pointer draws

function clearCanvas() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
}

function paintCanvasFromPixels() {
  clearCanvas();
  const block = canvas.width / SIDE;
  state.pixels.forEach((v, i) => {
    if (v <= 0) return;
    ctx.fillStyle = `rgba(${INK.join(", ")}, ${v})`;
    ctx.fillRect((i % SIDE) * block, Math.floor(i / SIDE) * block, block, block);
  });
}

function canvasPoint(event) {
  const box = canvas.getBoundingClientRect();
  return { x: ((event.clientX - box.left) / box.width) * canvas.width, y: ((event.clientY - box.top) / box.height) * canvas.height };
}

function drawSegment(from, to) {
  ctx.strokeStyle = `rgb(${INK.join(", ")})`;
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

// The drawing as the data was made: cropped to its ink, the longer side fitted to the 8x8 frame
// (the other centred), and each block's ink averaged into [0, 1].
function pixelsFromCanvas() {
  const { width, height } = canvas;
  const alpha = ctx.getImageData(0, 0, width, height).data;
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (alpha[(y * width + x) * 4 + 3] > 0) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  const pixels = new Float32Array(CELLS);
  if (x1 < 0) return pixels;
  const side = Math.max(x1 - x0 + 1, y1 - y0 + 1);
  const left = (x0 + x1 + 1) / 2 - side / 2;
  const top = (y0 + y1 + 1) / 2 - side / 2;
  const sums = new Float64Array(CELLS);
  for (let y = y0; y <= y1; y++) {
    const row = Math.min(SIDE - 1, Math.floor(((y + 0.5 - top) / side) * SIDE));
    for (let x = x0; x <= x1; x++) {
      const a = alpha[(y * width + x) * 4 + 3];
      if (a > 0) sums[row * SIDE + Math.min(SIDE - 1, Math.floor(((x + 0.5 - left) / side) * SIDE))] += a;
    }
  }
  const blockArea = (side / SIDE) ** 2 * 255;
  sums.forEach((s, i) => (pixels[i] = Math.min(1, s / blockArea)));
  return pixels;
}

let previewFrame = 0;
function previewDrawing() {
  if (previewFrame) return;
  previewFrame = requestAnimationFrame(() => {
    previewFrame = 0;
    state.pixels = pixelsFromCanvas();
    renderGrid();
  });
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  if (state.source.kind !== "drawing") clearCanvas(); // a new stroke over a sample starts a new drawing
  setSource({ kind: "drawing" });
  scheduleUpdate.cancel();
  stroke = { id: event.pointerId, ...canvasPoint(event) };
  drawSegment(stroke, stroke);
  previewDrawing();
});

canvas.addEventListener("pointermove", (event) => {
  if (!stroke || event.pointerId !== stroke.id) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const point = canvasPoint(e);
    drawSegment(stroke, point);
    Object.assign(stroke, point);
  }
  previewDrawing();
});

function endStroke(event) {
  if (!stroke || event.pointerId !== stroke.id) return;
  stroke = null;
  state.pixels = pixelsFromCanvas();
  renderGrid();
  inputChanged();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

const grid = $("#grid");
const cells = Array.from({ length: CELLS }, (_, i) =>
  grid.appendChild(el("div", { class: "cell", "data-index": String(i), "aria-hidden": "true" })),
);

function renderGrid() {
  cells.forEach((cell, i) => {
    cell.style.background = inkColor(state.pixels[i]);
    cell.classList.toggle("cursor", i === state.cursor);
  });
  grid.dataset.pixels = JSON.stringify(Array.from(state.pixels));
  grid.dataset.input = String(state.input);
}

grid.addEventListener("keydown", (event) => {
  const row = Math.floor(state.cursor / SIDE), col = state.cursor % SIDE;
  const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
  if (event.key in moves) {
    const [dr, dc] = moves[event.key];
    state.cursor = Math.min(SIDE - 1, Math.max(0, row + dr)) * SIDE + Math.min(SIDE - 1, Math.max(0, col + dc));
    renderGrid();
    announceCell();
  } else if (event.key === " " || event.key === "Enter" || event.key === "Delete" || event.key === "Backspace") {
    const ink = event.key === " " || event.key === "Enter" ? (state.pixels[state.cursor] >= 0.5 ? 0 : 1) : 0;
    state.pixels[state.cursor] = ink;
    setSource({ kind: "edited" });
    paintCanvasFromPixels();
    inputChanged();
    announceCell();
  } else {
    return;
  }
  event.preventDefault();
});

function announceCell() {
  const row = Math.floor(state.cursor / SIDE) + 1, col = (state.cursor % SIDE) + 1;
  grid.setAttribute("aria-label", `Row ${row}, column ${col}: ink ${state.pixels[state.cursor].toFixed(2)}`);
}

function setSource(source) {
  state.source = source;
  const line = $("#input-source");
  line.dataset.kind = source.kind;
  if (source.kind === "sample") {
    line.dataset.label = String(source.label);
    line.replaceChildren(
      `Held-out sample #${source.index + 1} of ${state.digits.targets.length}, true label `,
      el("strong", { text: String(source.label) }),
    );
    return;
  }
  delete line.dataset.label;
  line.textContent = {
    empty: "Empty: draw a digit, or pick a held-out sample.",
    drawing: "Your drawing (no true label).",
    edited: "Edited on the 8×8 grid (no true label).",
  }[source.kind];
}

$("#clear").addEventListener("click", () => {
  state.pixels = new Float32Array(CELLS);
  clearCanvas();
  setSource({ kind: "empty" });
  inputChanged(true);
});
$("#random").addEventListener("click", () => loadSample(Math.floor(Math.random() * state.digits.targets.length)));
for (let d = 0; d < 10; d++) {
  const button = el("button", { type: "button", text: String(d), disabled: true, "aria-label": `Held-out sample of class ${d}` });
  button.addEventListener("click", () => loadSample(randomItem(samplesOf(d))));
  $("#digit-picker").append(button);
}
$("#random").disabled = true;

// ---------------------------------------------------------------------------------------------
// Predictions of every served digit model

const scheduleUpdate = debounce(() => predictNow(), DEBOUNCE_MS);

function inputChanged(now = false) {
  state.input += 1;
  state.predictions.clear();
  renderGrid();
  if (now) predictNow();
  else scheduleUpdate();
}

function inferRequest(meta, rows) {
  const data = [];
  for (const row of rows) data.push(...row);
  return { inputs: [{ name: meta.inputs[0].name, datatype: "FP32", shape: [rows.length, 1, SIDE, SIDE], data }] };
}

function renderBars(container, probabilities, labels) {
  const top = argmax(probabilities);
  container.replaceChildren(
    ...probabilities.map((p, i) =>
      el(
        "div",
        { class: i === top ? "bar top" : "bar" },
        el("span", { text: labels?.[i] ?? String(i) }),
        el("span", { class: "track" }, el("span", { class: "fill", style: `width: ${(p * 100).toFixed(2)}%` })),
        el("span", { class: "pct", text: percent(p) }),
      ),
    ),
  );
  const ranked = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  container.setAttribute("role", "img");
  container.setAttribute("aria-label", "probabilities: " + ranked.map(([p, i]) => `${labels?.[i] ?? i} ${percent(p)}`).join(", "));
  container.dataset.probabilities = JSON.stringify(probabilities);
}

function predictionCard(model) {
  const box = $("#predictions");
  let card = box.querySelector(`[data-model="${CSS.escape(model.name)}"]`);
  if (!card) {
    card = el(
      "article",
      { class: "model-card", "data-model": model.name },
      el("header", {}, el("span", { class: "name", text: model.name }), el("span", { class: "norms", text: normText(model.meta.norm_layers) })),
      el("p", { class: "answer" }, el("span", { class: "predicted" }), el("span", { class: "confidence" })),
      el("div", { class: "bars" }),
      el("p", { class: "error", hidden: true }),
    );
    box.append(card);
  }
  return card;
}

async function predictNow() {
  scheduleUpdate.cancel();
  const models = digitModels();
  const box = $("#predictions");
  for (const card of box.querySelectorAll("[data-model]")) if (!models.some((m) => m.name === card.dataset.model)) card.remove();
  if (!models.length) {
    if (!box.querySelector(".muted")) box.append(el("p", { class: "muted", text: "No digit model is ready yet." }));
  } else {
    box.querySelector(".muted")?.remove();
  }
  const input = state.input;
  const pixels = state.pixels;
  requestBatchnorm();
  await Promise.all(
    models.map(async (model) => {
      const card = predictionCard(model);
      const result = await api(`/v2/models/${encodeURIComponent(model.name)}/infer`, inferRequest(model.meta, [pixels]));
      if (input !== state.input) return; // a newer input is on its way
      const error = card.querySelector(".error");
      if (!result.ok) {
        error.hidden = false;
        error.textContent = errorText(result);
        card.dataset.state = "error";
        card.dataset.input = String(input);
        return;
      }
      const wanted = digitOutput(model.meta).name;
      const output = result.data.outputs.find((o) => o.name === wanted) || result.data.outputs[0];
      const probabilities = softmax(output.data);
      const top = argmax(probabilities);
      state.predictions.set(model.name, top);
      error.hidden = true;
      card.querySelector(".predicted").textContent = labelOf(model.name, top);
      card.querySelector(".confidence").textContent = percent(probabilities[top]);
      renderBars(card.querySelector(".bars"), probabilities, model.meta.labels);
      card.dataset.state = "done";
      card.dataset.input = String(input);
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// The BatchNorm panel

// Every ready model with a batch-statistics graph: the digit models first.
function bnModels() {
  const ready = [...state.models.values()].filter((m) => m.state === "READY" && m.meta && hasBatchStats(m.meta));
  const digit = ready.filter((m) => isDigitModel(m.meta)).sort(byName);
  return [...digit, ...ready.filter((m) => !isDigitModel(m.meta)).sort(byName)];
}

function isDigitBn() {
  const meta = state.models.get(state.bnModel)?.meta;
  return Boolean(meta && isDigitModel(meta));
}

function renderBnPicker() {
  const select = $("#bn-model");
  const models = bnModels();
  const names = models.map((m) => m.name);
  if (JSON.stringify([...select.options].map((o) => o.value)) !== JSON.stringify(names)) {
    select.replaceChildren(...models.map((m) => el("option", { value: m.name, text: `${m.name} (${normText(m.meta.norm_layers)})` })));
  }
  const before = state.bnModel;
  if (!names.includes(state.bnModel)) state.bnModel = names.includes("cnn-bn") ? "cnn-bn" : names[0] || null;
  select.value = state.bnModel || "";
  select.disabled = !models.length;
  const others = digitModels().filter((m) => !hasBatchStats(m.meta) && !hasBatchNorm(m.meta));
  const without = [...state.models.values()].filter((m) => m.state === "READY" && m.meta && !hasBatchStats(m.meta) && hasBatchNorm(m.meta));
  const switchable = others.filter((m) => Object.keys(m.meta.norm_layers || {}).some((k) => SWITCHABLE_TYPE.test(k)));
  const plain = others.filter((m) => !switchable.includes(m));
  const named = (list) => list.map((m) => `${m.name} (${normText(m.meta.norm_layers)})`).join(", ");
  $("#bn-others").textContent = [
    plain.length
      ? `${named(plain)}: no running statistics needed. GroupNorm, InstanceNorm and LayerNorm normalize each ` +
        "sample by itself, so they have no batch dependence."
      : "",
    switchable.length
      ? `${named(switchable)}: Switchable Norm mixes each sample's own IN and LN statistics with BN statistics ` +
        "that are running statistics at inference, so it has no batch dependence either."
      : "",
    ...without.map((m) => m.meta.batch_statistics?.reason || `${m.name}: no batch-statistics graph.`),
  ].filter(Boolean).join(" ");
  if (state.bnModel !== before) bnModelChanged(false); // predictNow, which follows, sends the digits
  else renderCompanions();
}

// The panel takes digits for a digit model, a random batch of its declared inputs for any other.
function bnModelChanged(sendDigits = true) {
  const digit = isDigitBn();
  $("#bn-digit").hidden = !digit;
  $("#bn-random").hidden = digit || !state.bnModel;
  $("#bn-result").hidden = true;
  renderCompanions();
  if (digit) {
    if (sendDigits) requestBatchnorm();
  } else if (state.bnModel) {
    renderRandomControls(state.models.get(state.bnModel).meta);
    sendRandomBatch();
  }
}

$("#bn-model").addEventListener("change", (event) => {
  state.bnModel = event.target.value;
  bnModelChanged();
});

function batchLimit() {
  return state.models.get(state.bnModel)?.meta?.max_batch_size || 64;
}

// The class the companions of "same class" share: the input's true label, else what the BN model predicts.
function inputClass() {
  if (state.source.kind === "sample") return { label: state.source.label, why: "its true label" };
  const predicted = state.predictions.get(state.bnModel);
  if (predicted !== undefined) return { label: predicted, why: `${state.bnModel}'s prediction with running statistics` };
  return null;
}

function addCompanions(kind) {
  if (!state.digits || !state.bnModel) return;
  const room = batchLimit() - 1 - state.companions.length;
  const exclude = state.source.kind === "sample" ? state.source.index : -1;
  const current = inputClass();
  let picks = [];
  if (kind === "same" || kind === "other") {
    if (!current) {
      bnStatus("Draw or pick a digit first: the class of the input is not known yet.", "error");
      return;
    }
    picks =
      kind === "same"
        ? shuffled(samplesOf(current.label, exclude)).slice(0, ADD)
        : shuffled([...Array(10).keys()].filter((d) => d !== current.label))
            .slice(0, ADD)
            .map((d) => randomItem(samplesOf(d)));
  } else {
    picks = shuffled([...state.digits.targets.keys()].filter((i) => i !== exclude)).slice(0, ADD);
  }
  for (const index of picks.slice(0, Math.max(0, room))) {
    const image = state.digits.images[index];
    const pixels = kind === "shifted" ? image.map((v) => Math.min(1, v + SHIFT)) : Float32Array.from(image);
    state.companions.push({ pixels, label: state.digits.targets[index], index, kind });
  }
  renderCompanions();
  if (kind === "same") bnStatus(`Added held-out samples of class ${current.label} (${current.why}).`, "busy");
  requestBatchnorm();
}

$("#add-same").addEventListener("click", () => addCompanions("same"));
$("#add-other").addEventListener("click", () => addCompanions("other"));
$("#add-shifted").addEventListener("click", () => addCompanions("shifted"));
$("#remove-last").addEventListener("click", () => removeCompanion(state.companions.length - 1));
$("#clear-companions").addEventListener("click", () => {
  state.companions = [];
  renderCompanions();
  requestBatchnorm();
});
$("#add-shifted").textContent = `+${ADD} brightness-shifted (x + ${SHIFT})`;

function removeCompanion(i) {
  if (i < 0 || i >= state.companions.length) return;
  state.companions.splice(i, 1);
  renderCompanions();
  requestBatchnorm();
  // keep the keyboard where it was: on the companion that took this place, else the last one
  const buttons = document.querySelectorAll("#bn-companions button");
  (buttons[Math.min(i, buttons.length - 1)] || $("#remove-last")).focus();
}

const KIND_TEXT = { same: "same", other: "other", shifted: `+${SHIFT}` };

function renderCompanions() {
  const list = $("#bn-companions");
  const input = el(
    "li",
    { "data-row": "0" },
    el("span", { class: "current" }, paintThumb(el("canvas", { "aria-hidden": "true" }), state.pixels)),
    el("span", { class: "kind", text: "input" }),
    el("span", { class: "flip-line" }),
  );
  const items = state.companions.map((c, i) => {
    const button = el(
      "button",
      { type: "button", "aria-label": `Companion ${i + 1}: held-out ${c.label}${c.kind === "shifted" ? `, brightness +${SHIFT}` : ""}. Remove it.` },
      paintThumb(el("canvas", { "aria-hidden": "true" }), c.pixels),
    );
    button.addEventListener("click", () => removeCompanion(i));
    return el(
      "li",
      { "data-row": String(i + 1), "data-kind": c.kind },
      button,
      el("span", { class: "kind", text: `${KIND_TEXT[c.kind]} ${c.label}` }),
      el("span", { class: "flip-line" }),
    );
  });
  list.replaceChildren(input, ...items);
  const n = state.companions.length + 1;
  const full = n >= batchLimit();
  $("#bn-size").textContent = `(${n} ${n === 1 ? "sample" : "samples"}${full ? `, the most ${state.bnModel} takes` : ""})`;
  const usable = Boolean(state.bnModel && state.digits && isDigitBn());
  for (const id of ["#add-same", "#add-other", "#add-shifted"]) $(id).disabled = !usable || full;
  $("#remove-last").disabled = !state.companions.length;
  $("#clear-companions").disabled = !state.companions.length;
}

function bnStatus(text, kind) {
  const status = $("#bn-status");
  status.textContent = text;
  status.dataset.state = kind;
  status.classList.toggle("bad", kind === "error");
}

let bnRequests = 0;
async function requestBatchnorm() {
  renderCompanions();
  const model = state.models.get(state.bnModel);
  if (!model) {
    const settled = [...state.models.values()].some((m) => m.meta);
    bnStatus(settled ? "No served model has a batch-statistics graph." : "Waiting for the models…", "idle");
    return;
  }
  if (!isDigitModel(model.meta)) return; // its batch is a random one, sent by its own button
  const request = ++bnRequests;
  const input = state.input;
  const rows = [state.pixels, ...state.companions.map((c) => c.pixels)];
  bnStatus(`Running a batch of ${rows.length} through ${model.name}…`, "busy");
  const result = await api(`/v2/models/${encodeURIComponent(model.name)}/batchnorm`, inferRequest(model.meta, rows));
  if (request !== bnRequests) return; // a newer batch is on its way
  if (!result.ok) {
    bnStatus(errorText(result), "error");
    $("#bn-result").hidden = true;
    return;
  }
  renderBatchnorm(result.data, input);
  const changed = result.data.changed.filter(Boolean).length;
  bnStatus(`${model.name}, batch of ${result.data.batch_size}: ${changed} of ${result.data.batch_size} changed class.`, "done");
}

function renderOutcome(box, side, labels) {
  const probabilities = side.probabilities[0];
  const top = side.predictions[0];
  box.querySelector(".predicted").textContent = labels?.[top] ?? String(top);
  box.querySelector(".confidence").textContent = percent(probabilities[top]);
  renderBars(box.querySelector(".bars"), probabilities, labels);
  box.dataset.probabilities = JSON.stringify(probabilities);
  box.dataset.predicted = String(top);
}

function renderBatchnorm(answer, input) {
  const result = $("#bn-result");
  result.hidden = false;
  $("#bn-compare").hidden = false;
  $("#bn-outputs").hidden = true;
  renderOutcome($("#bn-running"), answer.running, answer.labels);
  renderOutcome($("#bn-batch"), answer.batch, answer.labels);
  const badge = $("#bn-changed");
  badge.textContent = answer.changed[0] ? "changed" : "same";
  badge.className = `badge ${answer.changed[0] ? "changed" : "same"}`;
  badge.setAttribute("aria-label", answer.changed[0] ? "The input's class changed with batch statistics" : "The input's class is the same with batch statistics");
  const changed = answer.changed.filter(Boolean).length;
  $("#bn-summary").textContent =
    `${changed} of ${answer.batch_size} ${answer.batch_size === 1 ? "sample" : "samples"} in the batch changed class.`;
  // under each thumbnail: running → batch prediction
  answer.changed.forEach((flip, row) => {
    const li = $(`#bn-companions [data-row="${row}"]`);
    if (!li) return;
    const line = li.querySelector(".flip-line");
    const from = answer.labels?.[answer.running.predictions[row]] ?? answer.running.predictions[row];
    const to = answer.labels?.[answer.batch.predictions[row]] ?? answer.batch.predictions[row];
    line.textContent = `${from}→${to}`;
    line.className = flip ? "flip-line flip" : "flip-line";
    li.dataset.changed = String(flip);
  });
  renderLayers(answer);
  result.dataset.batchSize = String(answer.batch_size);
  result.dataset.input = String(input);
  result.dataset.companions = String(state.companions.length);
  result.dataset.model = answer.model_name;
}

// Per layer: the batch's statistics against the running ones; and the note for a batch of one.
function renderLayers(answer) {
  const note = $("#bn-note");
  note.hidden = !answer.note;
  note.textContent = answer.note || "";
  const largest = Math.max(...answer.layers.map((l) => l.distance), 1e-12);
  $("#bn-layers tbody").replaceChildren(
    ...answer.layers.map((layer) =>
      el(
        "tr",
        { "data-layer": layer.name },
        el("td", { class: "layer", text: layer.name }),
        el("td", { text: layer.type }),
        el("td", { text: String(layer.channels) }),
        el("td", { text: layer.reduced_over }),
        el("td", { class: "values", text: layer.values_per_channel === undefined ? "" : String(layer.values_per_channel) }),
        el(
          "td",
          { class: "dist" },
          el("span", { class: "track" }, el("span", { class: "fill", style: `width: ${((layer.distance / largest) * 100).toFixed(1)}%` })),
          el("span", { class: "value", text: layer.distance.toFixed(3) }),
        ),
      ),
    ),
  );
  const counted = answer.layers.some((layer) => layer.values_per_channel !== undefined);
  for (const cell of document.querySelectorAll("#bn-layers .values")) cell.hidden = !counted;
  $("#bn-distance").textContent = answer.distance ? `Distance: ${answer.distance}.` : "";
}

// ---------------------------------------------------------------------------------------------
// A seeded random batch, for a model with a batch-statistics graph that does not take digits

// mulberry32: a small seeded generator of uniform numbers in [0, 1).
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), a | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function standardNormal(uniform) {
  return Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform()); // Box-Muller
}

// Every declared input, its -1 dimension set to `rows`: integers in [0, 10), true for BOOL, standard normal floats.
function randomBatch(meta, rows, seed) {
  const uniform = seeded(seed);
  return {
    inputs: meta.inputs.map((t) => {
      const shape = t.shape.map((d) => (d === -1 ? rows : d));
      const count = shape.reduce((a, b) => a * b, 1);
      const value =
        t.datatype === "BOOL" ? () => true : INTEGER_TYPE.test(t.datatype) ? () => Math.floor(uniform() * 10) : () => standardNormal(uniform);
      return { name: t.name, datatype: t.datatype, shape, data: Array.from({ length: count }, value) };
    }),
  };
}

function renderRandomControls(meta) {
  const batched = meta.max_batch_size > 0;
  const rows = $("#bn-rows");
  rows.hidden = !batched;
  $('label[for="bn-rows"]').hidden = !batched;
  if (batched) {
    rows.max = String(meta.max_batch_size);
    rows.value = String(Math.min(RANDOM_ROWS, meta.max_batch_size));
  }
  $("#bn-shapes").textContent = batched
    ? `Inputs: ${tensorsText(meta.inputs)}; -1 is the rows, up to ${meta.max_batch_size}.`
    : `Inputs: ${tensorsText(meta.inputs)}; no batch dimension: the statistics are those of this one fixed-size batch.`;
}

async function sendRandomBatch() {
  const model = state.models.get(state.bnModel);
  if (!model?.meta || isDigitModel(model.meta)) return;
  const meta = model.meta;
  const batched = meta.max_batch_size > 0;
  const rows = batched ? Math.min(meta.max_batch_size, Math.max(1, parseInt($("#bn-rows").value, 10) || 1)) : 1;
  const seed = Math.max(0, parseInt($("#bn-seed").value, 10) || 0);
  if (batched) $("#bn-rows").value = String(rows);
  $("#bn-seed").value = String(seed);
  const request = ++bnRequests;
  bnStatus(`Running a random batch (seed ${seed}) through ${model.name}…`, "busy");
  const result = await api(`/v2/models/${encodeURIComponent(model.name)}/batchnorm`, randomBatch(meta, rows, seed));
  if (request !== bnRequests) return; // a newer batch is on its way
  if (!result.ok) {
    bnStatus(errorText(result), "error");
    $("#bn-result").hidden = true;
    return;
  }
  const answer = result.data;
  renderRandomResult(answer, seed);
  const changed = answer.changed.filter(Boolean).length;
  bnStatus(
    `${model.name}, a random batch of ${answer.batch_size} rows (seed ${seed}): ${changed} of ${answer.batch_size} ` +
      `rows changed the index of their largest ${answer.output} value.`,
    "done",
  );
}

function renderRandomResult(answer, seed) {
  const result = $("#bn-result");
  result.hidden = false;
  $("#bn-compare").hidden = true;
  let largest = 0;
  answer.running.logits.forEach((row, i) => row.forEach((v, j) => (largest = Math.max(largest, Math.abs(v - answer.batch.logits[i][j])))));
  const summary = $("#bn-outputs");
  summary.hidden = false;
  summary.textContent =
    `Output ${answer.output}, ${answer.batch_size} rows of ${answer.running.logits[0]?.length ?? 0}: the batch's own ` +
    `statistics move it by up to ${largest.toPrecision(3)} from what the running statistics give.`;
  renderLayers(answer);
  result.dataset.batchSize = String(answer.batch_size);
  result.dataset.model = answer.model_name;
  result.dataset.seed = String(seed);
}

$("#bn-send").addEventListener("click", () => sendRandomBatch());
$("#bn-reseed").addEventListener("click", () => {
  $("#bn-seed").value = String((parseInt($("#bn-seed").value, 10) || 0) + 1);
  sendRandomBatch();
});

// The experiments' plots (make experiments), one line each, where they have been drawn.
async function loadPlots() {
  let plots;
  try {
    const response = await fetch("/demo/plots/plots.json");
    if (!response.ok) return; // not drawn yet: the note says how
    plots = await response.json();
  } catch {
    return;
  }
  $("#experiments-note").textContent = "Measured by make experiments on normserve's own models; " +
    "docs/batchnorm.md has the tables and the explanations.";
  $("#experiment-plots").replaceChildren(
    ...plots.map((p) =>
      el("figure", { class: "plot" },
        el("img", { src: `/demo/plots/${p.file}`, alt: p.caption }),
        el("figcaption", { text: p.caption }),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------

renderGrid();
setSource({ kind: "empty" });
renderCompanions();
refreshModels();
loadDigits();
loadPlots();
