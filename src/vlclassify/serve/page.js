// The page: pick or drop an image (and type its title when the model reads one), send it to
// /predict, draw the scores as bars with the decision, the attention map (/explain) where the
// method has one, and the modality weights. Same-origin requests only; no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let file = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorOf(resp) {
  try {
    return (await resp.json()).error || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModel() {
  const resp = await fetch("/model");
  if (!resp.ok) {
    showError("cannot read the model: " + (await errorOf(resp)));
    return;
  }
  model = await resp.json();
  const tasks = Object.keys(model.tasks);
  $("model").textContent = model.method + " on " + model.backbone.name + " \u00b7 " + model.classes.length +
    " classes" + (tasks.length > 1 ? " \u00b7 tasks: " + tasks.join(", ") : "");
  $("title-box").hidden = !model.takes_text;
}

function decisionText(t) {
  if (t.unknown) return "unknown";
  if (t.uncertain) return "uncertain";
  if (!t.labels.length) return "no label found";
  return t.labels.join(", ");
}

function bars(scores, chosen) {
  const box = el("div", "bars");
  for (const s of scores) {
    const row = el("div", "bar" + (chosen.includes(s.label) ? " chosen" : ""));
    row.dataset.label = s.label;
    row.dataset.score = String(s.score);
    const fill = el("span", "bar-fill");
    fill.style.width = (100 * s.score).toFixed(1) + "%";
    const track = el("span", "bar-track");
    track.appendChild(fill);
    row.append(el("span", "bar-label", s.label), track, el("span", "bar-pct", (100 * s.score).toFixed(1) + "%"));
    box.appendChild(row);
  }
  return box;
}

function render(pred) {
  const main = Object.keys(model.tasks)[0];
  const d = $("decision");
  d.textContent = decisionText(pred);
  d.classList.toggle("uncertain", pred.uncertain);
  d.classList.toggle("unknown", pred.unknown);
  const rule = model.decisions[main];
  $("rule").textContent = rule ? "decision rule: " + rule.rule : "";
  const o = pred.open_set;
  $("openset").textContent = o
    ? (pred.unknown ? "none of the classes: " : "") + o.score + " score " + o.value.toPrecision(3) +
      ", unknown below " + o.threshold.toPrecision(3)
    : "";
  $("bars").replaceWith(Object.assign(bars(pred.scores, pred.labels), { id: "bars" }));
  const tasks = $("tasks");
  tasks.replaceChildren();
  for (const [name, t] of Object.entries(pred.tasks || {})) {
    if (name === main) continue;
    const box = el("div", "task");
    box.dataset.task = name;
    box.append(el("h3", "", name + ": " + decisionText(t)), bars(t.scores, t.labels));
    tasks.appendChild(box);
  }
  const w = $("weights");
  w.replaceChildren(el("h3", "", "Modality weights"));
  w.hidden = !pred.modality_weights;
  for (const [name, mw] of Object.entries(pred.modality_weights || {})) {
    const split = el("div", "split");
    const img = el("span", "image");
    img.style.width = (100 * mw.image).toFixed(1) + "%";
    const txt = el("span", "text");
    txt.style.width = (100 * mw.text).toFixed(1) + "%";
    split.append(img, txt);
    w.append(el("div", "legend", name + ": image " + mw.image.toFixed(2) + " \u00b7 text " + mw.text.toFixed(2)), split);
  }
  $("result").hidden = false;
}

function form() {
  const f = new FormData();
  f.append("image", file, file.name);
  const title = $("title").value.trim();
  if (model.takes_text && title) f.append("text", title);
  return f;
}

async function explain() {
  const heat = $("heat");
  const resp = await fetch("/explain", { method: "POST", body: form() });
  if (!resp.ok) {
    heat.hidden = false;
    $("heat-img").hidden = true;
    $("heat-caption").textContent = "no attention map: " + (await errorOf(resp));
    return;
  }
  const target = decodeURIComponent(resp.headers.get("X-Explained") || "");
  $("heat-img").src = URL.createObjectURL(await resp.blob());
  $("heat-img").hidden = false;
  $("heat-caption").textContent = "where the model looked for \u201c" + target + "\u201d";
  heat.hidden = false;
}

async function classify() {
  if (!file || !model) return;
  showError("");
  $("busy").hidden = false;
  $("classify").disabled = true;
  try {
    const f = form();
    f.append("top", "5");
    const resp = await fetch("/predict", { method: "POST", body: f });
    if (!resp.ok) {
      showError(await errorOf(resp));
      $("result").hidden = true;
      return;
    }
    render(await resp.json());
    $("heat").hidden = true;
    if (model.explain) await explain();
  } catch (e) {
    showError("request failed: " + e);
  } finally {
    $("busy").hidden = true;
    $("classify").disabled = false;
  }
}

function choose(f) {
  if (!f) return;
  file = f;
  const p = $("preview");
  p.src = URL.createObjectURL(f);
  p.hidden = false;
  $("classify").disabled = false;
  classify();
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  $("classify").addEventListener("click", classify);
  $("title").addEventListener("keydown", (e) => { if (e.key === "Enter") classify(); });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
