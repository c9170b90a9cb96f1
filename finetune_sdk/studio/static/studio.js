// finetune studio: the live parts of the pages. Plain JavaScript, no build step, no network beyond the studio.
// Every value from the server or a model is shown with textContent (never innerHTML).
"use strict";

const TOKEN = document.querySelector('meta[name="studio-token"]').content;
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const FIRST = ["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"];
const NOT_CHARTED = new Set(["step", "epoch", "time", "pid", "max_steps", "total_flos", "num_input_tokens_seen",
  "estimated_memory", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "peak_memory"]);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function api(method, path, body) {
  const response = await fetch(path, {method, headers: {"X-Studio-Token": TOKEN, "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body), credentials: "same-origin"});
  let data = null;
  try { data = await response.json(); } catch (e) { data = {error: response.statusText}; }
  return {ok: response.ok, data};
}

// ---- charts ---------------------------------------------------------------------------------------------------
class Charts {
  constructor(box) { this.box = box; this.series = {}; this.runs = []; this.hidden = new Set(); this.pending = false; }
  colour(run) { if (!this.runs.includes(run)) this.runs.push(run); return COLOURS[this.runs.indexOf(run) % COLOURS.length]; }
  add(event) {
    if (event.event !== "log" && event.event !== "eval") return;
    this.colour(event.run);
    for (const [key, value] of Object.entries(event)) {
      if (typeof value !== "number" || NOT_CHARTED.has(key)) continue;
      const byRun = (this.series[key] = this.series[key] || {});
      (byRun[event.run] = byRun[event.run] || []).push([event.step, value]);
    }
    if (!this.pending) { this.pending = true; requestAnimationFrame(() => { this.pending = false; this.draw(); }); }
  }
  draw() {
    const keys = Object.keys(this.series).sort((a, b) => {
      const ia = FIRST.indexOf(a), ib = FIRST.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
    });
    this.box.replaceChildren(this.legend(), ...keys.map((k) => this.chart(k, this.series[k])));
  }
  legend() {
    const legend = el("div", {class: "legend"});
    for (const run of this.runs) {
      const item = el("span", {class: "legend-item"});
      const swatch = el("span", {class: "swatch"}); swatch.style.background = this.colour(run);
      item.append(swatch, document.createTextNode(run)); legend.append(item);
    }
    return legend;
  }
  chart(key, byRun) {
    const W = 460, H = 220, L = 58, R = 10, T = 24, B = 30;
    const shown = Object.entries(byRun).filter(([run]) => !this.hidden.has(run));
    const points = shown.flatMap(([, pts]) => pts);
    const figure = el("figure", {class: "chart", "data-metric": key, "data-points": String(points.length)});
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("role", "img");
    const text = (x, y, s, anchor) => { const t = document.createElementNS(SVG, "text"); t.setAttribute("x", x);
      t.setAttribute("y", y); t.setAttribute("text-anchor", anchor || "start"); t.textContent = s; svg.append(t); };
    text(L, 14, key);
    if (points.length) {
      const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
      let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      if (x0 === x1) { x0 -= 1; x1 += 1; } if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
      const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
      const axis = document.createElementNS(SVG, "path");
      axis.setAttribute("d", `M${L},${T} V${H - B} H${W - R}`); axis.setAttribute("class", "axis"); svg.append(axis);
      const fmt = (v) => Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(3) : v.toPrecision(3);
      text(L - 4, T + 4, fmt(y1), "end"); text(L - 4, H - B, fmt(y0), "end");
      text(L, H - 8, `step ${x0}`); text(W - R, H - 8, `step ${x1}`, "end");
      for (const [run, pts] of shown) {
        const line = document.createElementNS(SVG, "polyline");
        line.setAttribute("points", pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
        line.setAttribute("fill", "none"); line.setAttribute("stroke", this.colour(run)); line.setAttribute("stroke-width", "2");
        line.setAttribute("data-run", run); svg.append(line);
        if (pts.length < 60) for (const [x, y] of pts) {
          const dot = document.createElementNS(SVG, "circle");
          dot.setAttribute("cx", sx(x).toFixed(1)); dot.setAttribute("cy", sy(y).toFixed(1)); dot.setAttribute("r", "2.5");
          dot.setAttribute("fill", this.colour(run)); svg.append(dot);
        }
      }
    } else text(W / 2, H / 2, "no points yet", "middle");
    figure.append(svg);
    return figure;
  }
}

function stream(names, charts, onStatus) {
  if (!names.length) return null;
  const source = new EventSource("/api/stream?runs=" + encodeURIComponent(names.join(",")));
  source.addEventListener("run", (m) => charts.add(JSON.parse(m.data)));
  source.addEventListener("status", (m) => onStatus && onStatus(JSON.parse(m.data)));
  return source;
}

function formatBytes(n) {
  if (typeof n !== "number") return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function runsPage() {
  const box = document.getElementById("charts");
  const charts = new Charts(box);
  const names = (box.dataset.runs || "").split(",").filter(Boolean);
  stream(names, charts, (s) => {
    const cell = document.querySelector(`tr[data-run="${CSS.escape(s.name)}"] .status`);
    if (cell) { cell.textContent = s.status; cell.className = "status " + s.status; }
  });
  for (const box of document.querySelectorAll("input.overlay")) {
    box.addEventListener("change", () => { box.checked ? charts.hidden.delete(box.value) : charts.hidden.add(box.value); charts.draw(); });
  }
}

function runPage() {
  const box = document.getElementById("charts");
  const name = box.dataset.runs;
  const charts = new Charts(box);
  const stop = document.getElementById("stop"), resume = document.getElementById("resume");
  const message = document.getElementById("action-message");
  const original = charts.add.bind(charts);
  charts.add = (event) => {
    if (event.event === "log") document.getElementById("step").textContent = event.step;
    if (event.event === "start") document.getElementById("device").textContent = event.device;
    if (event.event === "start" && event.estimated_memory) document.getElementById("estimate").textContent = formatBytes(event.estimated_memory);
    if (event.event === "end") document.getElementById("peak").textContent = formatBytes(event.peak_memory);
    original(event);
  };
  stream([name], charts, (s) => {
    const status = document.getElementById("status");
    status.textContent = s.status; status.className = "status " + s.status;
    stop.disabled = !s.can_stop; resume.disabled = !s.can_resume;
  });
  for (const [button, action] of [[stop, "stop"], [resume, "resume"]]) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      const r = await api("POST", `/api/runs/${encodeURIComponent(name)}/${action}`);
      message.textContent = r.ok ? ` ${action === "stop" ? "stopping after this step…" : "resuming…"}` : " " + r.data.error;
      if (r.ok && action === "resume") setTimeout(() => location.reload(), 500);
    });
  }
}

// ---- the form -------------------------------------------------------------------------------------------------
function fieldRow(label, input, name, help) {
  const row = el("div", {class: "field"});
  const lab = el("label", {for: "f-" + name}, label);
  input.id = "f-" + name; input.name = name;
  row.append(lab, input, el("span", {class: "field-error", "data-for": name}));
  input.addEventListener("input", () => showFieldError(name, ""));  // a stale message goes once the value changes
  if (help) row.append(el("small", {class: "help"}, help));
  return row;
}

function select(options, value, blank) {
  const s = el("select");
  if (blank !== undefined) s.append(el("option", {value: ""}, blank));
  for (const o of options) { const opt = el("option", {value: o}, o); if (o === value) opt.selected = true; s.append(opt); }
  return s;
}

function showFieldError(name, message) {
  const slot = document.querySelector(`.field-error[data-for="${CSS.escape(name)}"]`);
  if (slot) slot.textContent = message || "";
  return slot;
}

function formValues() {
  const form = document.getElementById("run-form");
  const get = (n) => (form.elements[n] ? form.elements[n].value.trim() : "");
  const options = {};
  for (const input of form.querySelectorAll("[data-option]")) {  // only what the user set: the rest stays default
    if (input.dataset.changed !== "1") continue;
    const v = input.type === "checkbox" ? (input.indeterminate ? "" : String(input.checked)) : input.value.trim();
    if (v !== "") options[input.name] = v;
  }
  return {name: get("name"), model: get("model"), data: get("data"), eval_data: get("eval_data"),
    technique: get("technique"), quantizer: get("quantizer"), formatter: get("formatter"), options};
}

async function newRunPage() {
  const [schema, files] = await Promise.all([api("GET", "/api/options"), api("GET", "/api/files")]);
  const box = document.getElementById("form-fields");
  const name = el("input", {type: "text", value: "run-" + new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")});
  const model = el("input", {type: "text", list: "models", value: files.data.models[0] || ""});
  const models = el("datalist", {id: "models"}); for (const m of files.data.models) models.append(el("option", {value: m}));
  const data = el("input", {type: "text", list: "datafiles", value: files.data.data[0] || ""});
  const evalData = el("input", {type: "text", list: "datafiles", value: ""});
  const datalist = el("datalist", {id: "datafiles"}); for (const d of files.data.data) datalist.append(el("option", {value: d}));
  box.append(models, datalist, fieldRow("run name", name, "name"), fieldRow("model", model, "model", "a model folder or .gguf file under " + files.data.root),
    fieldRow("training data", data, "data"), fieldRow("eval data", evalData, "eval_data", "optional"),
    fieldRow("technique", select(schema.data.techniques, "lora"), "technique"),
    fieldRow("quantizer", select(schema.data.quantizers, "", "(the technique's)"), "quantizer"),
    fieldRow("formatter", select(schema.data.formatters, "", "(detect from the columns)"), "formatter"));
  const shown = el("div", {id: "options-shown"}), more = el("details");
  more.append(el("summary", {}, "more options"));
  const rows = [];
  for (const f of schema.data.fields) {
    let input;
    if (f.type === "bool") { input = el("input", {type: "checkbox"}); input.indeterminate = f.default === null; input.checked = !!f.default;
      input.addEventListener("change", () => { input.indeterminate = false; }); }
    else if (f.choices) input = select(f.choices.map(String), "", `(default: ${f.default})`);
    else input = el("input", {type: "text", placeholder: f.default === null ? "" : String(f.default)});
    input.setAttribute("data-option", f.type);
    const scope = f.group === "training" ? "" : ` (${f.plugins.join(", ")})`;
    const row = fieldRow(f.name, input, f.name, f.help + (f.range ? ` [${f.range}]` : "") + scope);
    input.addEventListener("input", () => { input.dataset.changed = "1"; });
    input.addEventListener("change", async () => {
      input.dataset.changed = "1";
      const value = input.type === "checkbox" ? String(input.checked) : input.value.trim();
      if (value === "") { showFieldError(f.name, ""); return; }
      const r = await api("POST", "/api/validate", {name: f.name, value});
      showFieldError(f.name, r.data.error);
    });
    rows.push([f, row]);
  }
  // the common training options and those of the chosen technique and quantizer first, the rest folded away
  const place = () => {
    const chosen = [box.querySelector("#f-technique").value, box.querySelector("#f-quantizer").value];
    for (const [f, row] of rows) (f.common || f.plugins.some((p) => chosen.includes(p)) ? shown : more).append(row);
  };
  box.append(shown, more);
  place();
  box.querySelector("#f-technique").addEventListener("change", place);
  box.querySelector("#f-quantizer").addEventListener("change", place);
  const message = document.getElementById("form-message");
  document.getElementById("run-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
    message.textContent = "starting…";
    const r = await api("POST", "/api/runs", formValues());
    if (r.ok) { location.href = "/runs/" + encodeURIComponent(r.data.name); return; }
    message.textContent = r.data.error || "refused";
    for (const [field, error] of Object.entries(r.data.fields || {})) showFieldError(field, error);
  });
  document.getElementById("preview-button").addEventListener("click", preview);
  document.getElementById("advise-button").addEventListener("click", advise);
}

async function preview() {
  const out = document.getElementById("preview");
  out.replaceChildren(el("p", {}, "formatting…"));
  const r = await api("POST", "/api/preview", formValues());
  if (!r.ok) { out.replaceChildren(el("p", {class: "error"}, r.data.error)); return; }
  const key = el("p", {class: "key"});
  key.append("formatter ", el("code", {}, r.data.formatter), `, ${r.data.total_rows} rows; `,
    el("span", {class: "tok learnt"}, "learnt tokens"), " ", el("span", {class: "tok masked"}, "masked tokens (no loss)"));
  out.replaceChildren(el("h2", {}, "Dataset preview"), key);
  r.data.rows.forEach((tokens, i) => {
    const row = el("pre", {class: "row", "data-row": String(i)});
    for (const [text, learnt] of tokens) row.append(el("span", {class: "tok " + (learnt ? "learnt" : "masked")}, text));
    out.append(row);
  });
}

async function advise() {
  const out = document.getElementById("advice");
  out.replaceChildren(el("p", {}, "estimating…"));
  const r = await api("POST", "/api/advise", formValues());
  if (!r.ok) { out.replaceChildren(el("p", {class: "error"}, r.data.error)); return; }
  const rec = r.data.recommended, chosen = r.data.chosen || {};
  out.replaceChildren(el("h2", {}, "Advice"),
    el("p", {id: "chosen-memory"}, chosen.text ? `memory estimate for these settings: ${chosen.text} (${chosen.device})` : (chosen.error || "no estimate for this technique")),
    el("p", {}, `recommended: ${rec.technique}${rec.quantizer ? " + " + rec.quantizer : ""}, about ${rec.memory}${rec.fits ? "" : " (does not fit)"}`),
    el("pre", {}, rec.command));
  const list = el("ul"); for (const reason of rec.reasons) list.append(el("li", {}, reason)); out.append(list);
}

// ---- the registry ---------------------------------------------------------------------------------------------
async function registryPage() {
  const r = await api("GET", "/api/registry");
  const adapters = document.getElementById("adapters"), lineage = document.getElementById("lineage");
  if (!r.data.adapters.length) { adapters.replaceChildren(el("p", {class: "empty"}, "No adapters published yet.")); return; }
  drawLineage(lineage, r.data);
  for (const a of r.data.adapters) {
    const section = el("section", {class: "adapter", "data-adapter": a.name});
    section.append(el("h3", {}, a.name));
    const table = el("table", {class: "versions"});
    table.append(el("tr", {}, ""));
    table.firstChild.append(...["ref", "created", "aliases", "tags", "parent", "technique", "train loss", "run", ""].map((h) => el("th", {}, h)));
    for (const v of a.versions) {
      const tr = el("tr", {"data-ref": v.ref});
      for (const value of [v.ref, v.created, v.aliases.join(", "), v.tags.join(", "), v.parent || "", v.technique,
        typeof v.train_loss === "number" ? v.train_loss.toFixed(4) : ""]) tr.append(el("td", {}, value));
      const run = el("td");
      if (v.run) run.append(el("a", {href: "/runs/" + encodeURIComponent(v.run), class: "run-link"}, v.run));
      else run.textContent = v.source || "";
      tr.append(run);
      const actions = el("td"), verify = el("button", {class: "verify"}, "verify hashes"), result = el("span", {class: "verify-result"});
      verify.addEventListener("click", async () => {
        const res = await api("POST", "/api/registry/verify", {ref: v.ref});
        result.textContent = res.ok ? (res.data.ok ? ` ok (${res.data.files} files)` : " " + res.data.error) : " " + res.data.error;
      });
      const alias = el("input", {type: "text", class: "alias", placeholder: "alias"}), set = el("button", {class: "set-alias"}, "set alias");
      set.addEventListener("click", async () => {
        const res = await api("POST", "/api/registry/alias", {ref: v.ref, alias: alias.value.trim()});
        if (res.ok) location.reload(); else result.textContent = " " + res.data.error;
      });
      actions.append(verify, alias, set, result); tr.append(actions); table.append(tr);
    }
    section.append(table); adapters.append(section);
  }
}

function drawLineage(box, data) {
  const nodes = {}, rowOf = {};
  data.adapters.forEach((a, row) => a.versions.forEach((v, col) => { nodes[v.ref] = {x: 100 + col * 200, y: 40 + row * 80, v}; rowOf[v.ref] = row; }));
  const W = Math.max(400, ...Object.values(nodes).map((n) => n.x + 100)), H = 40 + data.adapters.length * 80;
  const svg = document.createElementNS(SVG, "svg"); svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("class", "lineage");
  svg.setAttribute("width", W); svg.setAttribute("height", H);  // drawn at its own size: text stays 11px
  for (const [parent, child] of data.edges) {
    if (!nodes[parent] || !nodes[child]) continue;
    const line = document.createElementNS(SVG, "line");
    for (const [k, v] of Object.entries({x1: nodes[parent].x + 80, y1: nodes[parent].y, x2: nodes[child].x - 80, y2: nodes[child].y})) line.setAttribute(k, v);
    line.setAttribute("class", "edge"); line.setAttribute("data-edge", `${parent}->${child}`); svg.append(line);
  }
  for (const [ref, n] of Object.entries(nodes)) {
    const g = document.createElementNS(SVG, "g"); g.setAttribute("data-node", ref);
    const rect = document.createElementNS(SVG, "rect");
    for (const [k, v] of Object.entries({x: n.x - 80, y: n.y - 20, width: 160, height: 40, rx: 6})) rect.setAttribute(k, v);
    const label = document.createElementNS(SVG, "text"); label.setAttribute("x", n.x); label.setAttribute("y", n.y - 3);
    label.setAttribute("text-anchor", "middle"); label.textContent = ref;
    const sub = document.createElementNS(SVG, "text"); sub.setAttribute("x", n.x); sub.setAttribute("y", n.y + 12);
    sub.setAttribute("text-anchor", "middle"); sub.setAttribute("class", "sub");
    const extra = n.v.federated ? "federated" : n.v.stage !== null && n.v.stage !== undefined ? `stage ${n.v.stage}` : n.v.technique || "";
    sub.textContent = [extra, n.v.run ? "run " + n.v.run : "", ...n.v.aliases].filter(Boolean).join(" · ");
    g.append(rect, label, sub); svg.append(g);
  }
  box.replaceChildren(svg);
}

const PAGES = {runs: runsPage, run: runPage, new: newRunPage, registry: registryPage};
if (PAGES[document.body.dataset.page]) PAGES[document.body.dataset.page]();
