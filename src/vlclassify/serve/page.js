// The page: pick or drop an image (for a model that reads text, its title first), send it to
// /predict, draw the scores as bars with the decision, the attention map (/explain) where the
// method has one, and the modality weights. A photo over the service's limits is shrunk here
// (canvas) before it is sent. Errors show the service's message for people. Same-origin requests
// only; no external assets.
"use strict";

const $ = (id) => document.getElementById(id);
const SHRUNK_PIXELS = 12e6; // a photo over the limits is sent at about this size (the model needs far less)
let model = null;
let upload = null; // {blob, name}: what is sent for the chosen file

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
  // {code, message}: the service's error for people (its `detail` is for logs and developers)
  try {
    const body = await resp.json();
    return { code: body.code || "", message: body.message || resp.statusText };
  } catch (e) {
    return { code: "", message: "The service answered " + resp.status + " " + resp.statusText + "." };
  }
}

async function loadModel() {
  const resp = await fetch("/model");
  if (!resp.ok) {
    showError("Cannot read the model. " + (await errorOf(resp)).message);
    return;
  }
  model = await resp.json();
  const tasks = Object.keys(model.tasks);
  $("model").textContent = model.method + " on " + model.backbone.name + " \u00b7 " + model.classes.length +
    " classes" + (tasks.length > 1 ? " \u00b7 tasks: " + tasks.join(", ") : "");
  $("title-box").hidden = !model.takes_text;
  if (model.takes_text) $("drop-text").firstChild.textContent = "2. Drop an image here, or ";
}

function decisionText(t) {
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

function labelWidth(pred) {
  // one label column for every task's bars, so the bars of all tasks start and end together
  let longest = 0;
  for (const t of [pred, ...Object.values(pred.tasks || {})]) {
    for (const s of t.scores) longest = Math.max(longest, s.label.length);
  }
  return Math.min(longest, 28) + 1 + "ch";
}

function render(pred) {
  const names = Object.keys(model.tasks);
  const main = names[0];
  $("result-title").textContent = names.length > 1 ? main : "Decision";
  $("result").style.setProperty("--label-w", labelWidth(pred));
  const d = $("decision");
  d.textContent = decisionText(pred);
  d.classList.toggle("uncertain", pred.uncertain);
  const rule = model.decisions[main];
  $("rule").textContent = rule ? "decision rule: " + rule.rule : "";
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
  $("result").focus(); // keyboard and screen-reader users land on the answer (an aria-live region)
}

function form() {
  const f = new FormData();
  f.append("image", upload.blob, upload.name);
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
    $("heat-caption").textContent = "No attention map. " + (await errorOf(resp)).message;
    return;
  }
  const target = decodeURIComponent(resp.headers.get("X-Explained") || "");
  $("heat-img").src = URL.createObjectURL(await resp.blob());
  $("heat-img").hidden = false;
  $("heat-caption").textContent = "where the model looked for \u201c" + target + "\u201d";
  heat.hidden = false;
}

async function classify() {
  if (!upload || !model) return;
  showError("");
  $("busy").hidden = false;
  $("classify").disabled = true;
  try {
    const f = form();
    f.append("top", "5");
    const resp = await fetch("/predict", { method: "POST", body: f });
    if (!resp.ok) {
      const err = await errorOf(resp);
      showError(err.message);
      if (err.code === "not_an_image") $("preview").hidden = true;
      $("result").hidden = true;
      $("error").focus();
      return;
    }
    render(await resp.json());
    $("heat").hidden = true;
    if (model.explain) await explain();
  } catch (e) {
    showError("The service could not be reached. Please try again.");
  } finally {
    $("busy").hidden = true;
    $("classify").disabled = false;
  }
}

async function prepared(f) {
  // the file as sent: itself, or (over the pixel or byte limit) a JPEG drawn smaller on a canvas
  const lim = model.limits;
  let bmp;
  try {
    bmp = await createImageBitmap(f);
  } catch (e) {
    return { blob: f, name: f.name, note: "" }; // not an image the browser reads: the service says what it is
  }
  const w0 = bmp.width, h0 = bmp.height;
  if (w0 * h0 <= lim.max_pixels && f.size <= lim.max_bytes) {
    bmp.close();
    return { blob: f, name: f.name, note: "" };
  }
  const scale = Math.sqrt(Math.min(1, SHRUNK_PIXELS / (w0 * h0)));
  const w = Math.max(1, Math.round(w0 * scale)), h = Math.max(1, Math.round(h0 * scale));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").drawImage(bmp, 0, 0, w, h);
  bmp.close();
  const blob = await new Promise((done) => canvas.toBlob(done, "image/jpeg", 0.92));
  const name = f.name.replace(/\.[^.]*$/, "") + ".jpg";
  return { blob, name, note: "Shrunk from " + w0 + " \u00d7 " + h0 + " to " + w + " \u00d7 " + h + " pixels before sending." };
}

async function choose(f) {
  if (!f || !model) return;
  showError("");
  const p = $("preview");
  p.onerror = () => { p.hidden = true; }; // no broken-image icon beside an error
  p.src = URL.createObjectURL(f);
  p.hidden = false;
  $("classify").disabled = true;
  upload = await prepared(f);
  $("shrunk").textContent = upload.note;
  $("shrunk").hidden = !upload.note;
  $("classify").disabled = false;
  // a model that reads the title waits for Classify: sent without its title, the answer is a guess
  if (model.takes_text) $("classify").focus();
  else classify();
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
