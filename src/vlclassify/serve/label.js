// The labelling page: ask /next for this tab's image, show it with the classes as buttons (the
// model's likeliest first), send the answer (keys 1-9; s skip; u undo; multi-label: toggle, then
// Enter) and ask again. The tab's id lives in sessionStorage, so a reload keeps its lease.
"use strict";

const $ = (id) => document.getElementById(id);
const tab = sessionStorage.getItem("vlclassify-tab") || (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
sessionStorage.setItem("vlclassify-tab", tab);
let current = null;
let chosen = new Set();
let busy = false;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function post(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ tab, ...body }),
  });
  const data = await resp.json().catch(() => ({ message: resp.status + " " + resp.statusText }));
  if (!resp.ok) throw new Error(data.detail || data.message || resp.statusText);
  return data;
}

function showProgress(p) {
  $("progress").textContent = p.labelled + " / " + p.budget + " labelled (" + p.pool + " images in the pool)";
  const box = $("counts");
  box.replaceChildren();
  for (const [name, n] of Object.entries(p.counts)) {
    const row = document.createElement("div");
    row.className = "count";
    row.dataset.label = name;
    const a = document.createElement("span");
    a.textContent = name;
    const b = document.createElement("span");
    b.textContent = String(n);
    row.append(a, b);
    box.appendChild(row);
  }
}

async function showModel() {
  const resp = await fetch("/model");
  if (!resp.ok) return;
  const m = await resp.json();
  $("model").textContent = m.method
    ? m.method + " \u00b7 learnt from " + m.examples + " label(s) of this page \u00b7 refreshed " + m.refreshes +
      " time(s) (every " + m.refresh_every + " labels)" + (m.refreshing ? " \u00b7 refreshing\u2026" : "") +
      (m.error ? " \u00b7 last refresh failed: " + m.error : "")
    : "no model: suggestions by typicality (no labels needed)";
}

function render(item) {
  current = item;
  chosen = new Set();
  showProgress(item.progress);
  if (item.done) {
    $("done").hidden = false;
    $("photo").hidden = true;
    $("buttons").replaceChildren();
    $("name").textContent = "";
    document.body.dataset.current = "";
    return;
  }
  $("done").hidden = true;
  $("photo").hidden = false;
  $("photo").src = item.image;
  $("name").textContent = item.name + (item.guess ? " \u00b7 model's guess: " + item.guess : "");
  $("multi-help").hidden = !item.multilabel;
  document.body.dataset.current = String(item.id);
  const box = $("buttons");
  box.replaceChildren();
  item.classes.forEach((name, k) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.label = name;
    if (k === 0 && item.guess) b.classList.add("guess");
    if (k < 9) {
      const key = document.createElement("kbd");
      key.textContent = String(k + 1);
      b.appendChild(key);
    }
    b.append(name);
    b.addEventListener("click", () => pick(name));
    box.appendChild(b);
  });
}

async function run(action) {
  if (busy) return;
  busy = true;
  try {
    showError("");
    await action();
    render(await post("/next", {}));
    showModel();
  } catch (e) {
    showError(e.message);
    try {
      render(await post("/next", {}));
    } catch (e2) {
      showError(e2.message);
    }
  } finally {
    busy = false;
    document.body.dataset.ready = "1";
  }
}

function pick(name) {
  if (!current || current.done) return;
  if (current.multilabel) {
    chosen.has(name) ? chosen.delete(name) : chosen.add(name);
    for (const b of $("buttons").children) b.classList.toggle("on", chosen.has(b.dataset.label));
    return;
  }
  const id = current.id;
  run(() => post("/answer", { id, labels: [name] }));
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !current) return;
  if (ev.key >= "1" && ev.key <= "9") {
    const name = (current.classes || [])[Number(ev.key) - 1];
    if (name) pick(name);
  } else if (ev.key === "s" && !current.done) {
    const id = current.id;
    run(() => post("/skip", { id }));
  } else if (ev.key === "u") {
    run(() => post("/undo", {}));
  } else if (ev.key === "Enter" && current.multilabel && chosen.size) {
    const id = current.id;
    const labels = [...chosen];
    run(() => post("/answer", { id, labels }));
  }
});

run(async () => {
  const resp = await fetch("/state");
  if (!resp.ok) throw new Error("cannot read the session: " + resp.status);
  const st = await resp.json();
  $("status").textContent = "answers go to " + st.labels_file + " \u00b7 " + st.classes.length + " classes" +
    (st.multilabel ? " \u00b7 several per image" : "");
});
