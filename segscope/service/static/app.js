// The segscope web page: upload an image, draw the segments over it, list and highlight them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], file: null, image: null, result: null, map: null, hover: -1, selected: -1 };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  const response = await fetch("/v1/models");
  const model = (await response.json()).models[0];
  state.classes = model.classes;
  $("model").textContent = `${model.name} (${model.architecture}, ${model.classes.length} classes)`;
  for (const task of model.tasks) {
    const option = new Option(task, task, task === model.default_task, task === model.default_task);
    $("task").add(option);
  }
}

function pickFile(file) {
  if (!file) return;
  state.file = file;
  $("run").disabled = false;
  segment();
}

async function segment() {
  if (!state.file) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("task", $("task").value);
  form.append("output", "json");
  if ($("threshold").value !== "") form.append("threshold", $("threshold").value);
  document.body.dataset.state = "busy";
  $("run").disabled = true;
  setStatus(`segmenting ${state.file.name}…`);
  const started = performance.now();
  try {
    const [response, image] = await Promise.all([
      fetch("/v1/segment", { method: "POST", body: form }),
      loadImage(state.file),
    ]);
    const body = await response.json();
    if (!response.ok) {
      const error = body.error || { type: "error", message: response.statusText };
      throw new Error(`${response.status} ${error.type}: ${error.message}`);
    }
    show(image, body);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`${body.segments.length} segment(s), ${body.task} task, ${body.width}x${body.height}, ${seconds} s`);
    document.body.dataset.state = "ready";
  } catch (error) {
    setStatus(String(error.message || error), true);
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot display this image"));
    image.src = URL.createObjectURL(file);
  });
}

function show(image, result) {
  state.image = image;
  state.result = result;
  state.hover = -1;
  state.selected = -1;
  state.map = new Int32Array(result.width * result.height).fill(-1);
  result.segments.forEach((segment, index) => paintRle(segment.segmentation, index, state.map));
  const canvas = $("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  buildLegend(result.segments);
  $("download").disabled = false;
  draw();
}

function colorOf(segment) {
  const known = state.classes[segment.label_id];
  return known ? known.color : [128, 128, 128];
}

function buildLegend(segments) {
  const legend = $("legend");
  legend.replaceChildren();
  $("count").textContent = `(${segments.length})`;
  segments.forEach((segment, index) => {
    const item = document.createElement("li");
    item.dataset.index = index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colorOf(segment).join(",")})`;
    const label = document.createElement("span");
    label.textContent = segment.id !== undefined ? `${segment.label} #${segment.id}` : segment.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = segment.score.toFixed(2);
    item.append(swatch, label, score);
    item.addEventListener("mouseenter", () => setHover(index));
    item.addEventListener("mouseleave", () => setHover(-1));
    item.addEventListener("click", () => select(index));
    legend.append(item);
  });
}

function setHover(index) {
  if (index === state.hover) return;
  state.hover = index;
  draw();
}

function select(index) {
  state.selected = index === state.selected ? -1 : index;
  draw();
}

function focused() {
  return state.hover >= 0 ? state.hover : state.selected;
}

function draw() {
  const { image, result, map } = state;
  if (!result) return;
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, result.width, result.height);
  const pixels = context.getImageData(0, 0, result.width, result.height);
  const data = pixels.data;
  const colors = result.segments.map(colorOf);
  const focus = focused();
  for (let p = 0; p < map.length; p++) {
    const index = map[p];
    if (index < 0) continue;
    const alpha = focus < 0 ? 0.5 : index === focus ? 0.75 : 0.12;
    const color = colors[index];
    const o = p * 4;
    data[o] = data[o] * (1 - alpha) + color[0] * alpha;
    data[o + 1] = data[o + 1] * (1 - alpha) + color[1] * alpha;
    data[o + 2] = data[o + 2] * (1 - alpha) + color[2] * alpha;
  }
  if (focus >= 0) outline(data, map, focus, result.width, result.height);
  context.putImageData(pixels, 0, 0);
  for (const item of $("legend").children) {
    const index = Number(item.dataset.index);
    item.classList.toggle("active", index === focus);
    item.classList.toggle("selected", index === state.selected);
  }
  describe(focus);
}

function outline(data, map, index, width, height) {
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = y * width + x;
      if (map[p] !== index) continue;
      const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
        map[p - 1] !== index || map[p + 1] !== index || map[p - width] !== index || map[p + width] !== index;
      if (edge) data.set([255, 255, 255], p * 4);
    }
  }
}

function describe(index) {
  const text = $("selection");
  if (index < 0) {
    text.textContent = "Hover or click a segment.";
    return;
  }
  const segment = state.result.segments[index];
  const kind = segment.isthing === undefined ? "" : segment.isthing ? " (thing)" : " (stuff)";
  text.textContent = `${segment.label}${kind}: score ${segment.score.toFixed(3)}, ${segment.area} px` +
    (index === state.selected ? " (selected)" : "");
}

function segmentAt(event) {
  const canvas = $("canvas");
  const box = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * canvas.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * canvas.height);
  if (!state.map || x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return -1;
  return state.map[y * canvas.width + x];
}

function download() {
  if (!state.result) return;
  const blob = new Blob([JSON.stringify(state.result)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = (state.file.name.replace(/\.[^.]*$/, "") || "result") + ".json";
  link.click();
  URL.revokeObjectURL(link.href);
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => pickFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pickFile(event.dataTransfer.files[0]);
  });
  $("run").addEventListener("click", segment);
  $("task").addEventListener("change", segment);
  $("download").addEventListener("click", download);
  const canvas = $("canvas");
  canvas.addEventListener("mousemove", (event) => setHover(segmentAt(event)));
  canvas.addEventListener("mouseleave", () => setHover(-1));
  canvas.addEventListener("click", (event) => { const index = segmentAt(event); if (index >= 0) select(index); });
}

wire();
loadModel().catch((error) => setStatus(`cannot reach the server: ${error}`, true));
