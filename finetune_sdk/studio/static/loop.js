// finetune studio: the feedback loop's pages (chat, rating, retrain, export, compare, federated, scores).
// Uses el() and api() of studio.js. Model output is only ever set with textContent: never parsed as HTML.
"use strict";

function input(id, value, attrs) { return el("input", {id, value: value === undefined ? "" : String(value), ...(attrs || {})}); }
function labelled(text, node) { const l = el("label", {class: "inline"}, text + " "); l.append(node); return l; }
function say(box, text, error) { box.textContent = text; box.className = error ? "error" : "note"; }
function num(id) { const v = document.getElementById(id).value; return v === "" ? null : Number(v); }
function val(id) { return document.getElementById(id).value; }
function table(head, rows) {
  const t = el("table"); const tr = el("tr"); head.forEach(h => tr.append(el("th", {}, h))); t.append(tr);
  rows.forEach(r => { const row = el("tr"); r.forEach(c => row.append(el("td", {}, c === null || c === undefined ? "—" : c))); t.append(row); });
  return t;
}
function fmt(x) { return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toPrecision(4)) : x; }

let MODELS = null;
async function loadModels() { const r = await api("GET", "/api/models"); MODELS = r.data; return MODELS; }
function modelRefs() { return [...MODELS.base, ...MODELS.versions.map(v => v.ref), ...MODELS.results]; }
function modelSelect(id, value) {
  const s = el("select", {id}); modelRefs().forEach(m => { const o = el("option", {value: m}, m); if (m === value) o.selected = true; s.append(o); });
  return s;
}
function settingsFields(box) {
  box.append(labelled("max new tokens", input("max_new_tokens", 128, {type: "number", min: 1})),
    labelled("temperature", input("temperature", 0.8, {type: "number", step: "0.1", min: 0})),
    labelled("seed", input("seed", 0, {type: "number"})), labelled("rater", input("rater", "")));
}
function settings() { return {max_new_tokens: num("max_new_tokens"), temperature: num("temperature"), seed: num("seed")}; }

// ---- chat -----------------------------------------------------------------------------------------------------
const ANSWERS = [];
function ratingFiles(box) {
  box.append(el("br"), labelled("thumbs file", input("thumbs-file", "thumbs.jsonl")),
    labelled("pairs file", input("pairs-file", "pairs.jsonl")), labelled("edits file", input("edits-file", "edits.jsonl")));
}
function drawModelList() {
  const list = document.getElementById("model-choice"), checked = new Set([...list.querySelectorAll("input.model:checked")].map(c => c.value));
  list.replaceChildren();
  modelRefs().forEach((m, i) => {
    const c = el("input", {type: "checkbox", class: "model", value: m});
    c.checked = checked.size ? checked.has(m) : (i === 0 || i === modelRefs().length - 1);
    list.append(labelled(m, c));
  });
}
function drawModelChoice(box) {
  box.replaceChildren(el("div", {id: "model-choice"}), labelled("formatter for base models", input("base-formatter", "chatml")), el("br"));
  drawModelList(); settingsFields(box); ratingFiles(box);
}
async function rate(kind, answers, value, message) {
  const out = {thumbs: val("thumbs-file"), pair: val("pairs-file"), edit: val("edits-file")}[kind];
  const r = await api("POST", "/api/rate", {kind, answers, value, out});
  if (r.ok) say(message, `appended to ${r.data.file} (${r.data.rows} row${r.data.rows === 1 ? "" : "s"})`); else say(message, r.data.error, true);
  return r.ok;
}
function answerBox(column, model) {
  const box = el("div", {class: "answer", "data-column": column});
  box.append(el("h3", {}, model), el("pre", {class: "text"}), el("div", {class: "tools"}), el("div", {class: "rated"}));
  return box;
}
function addTools(box, answer) {
  const tools = box.querySelector(".tools"), rated = box.querySelector(".rated");
  const up = el("button", {class: "thumb-up"}, "Thumbs up"), down = el("button", {class: "thumb-down"}, "Thumbs down");
  const edit = el("button", {class: "edit"}, "Edit");
  up.onclick = async () => { if (await rate("thumbs", [answer.id], true, rated)) box.dataset.rated = "up"; };
  down.onclick = async () => { if (await rate("thumbs", [answer.id], false, rated)) box.dataset.rated = "down"; };
  edit.onclick = () => {
    const area = el("textarea", {class: "edit-text", rows: 3}); area.value = answer.text;
    const save = el("button", {class: "save-edit"}, "Save as the better answer");
    save.onclick = async () => { if (await rate("edit", [answer.id], area.value, rated)) box.dataset.rated = "edited"; };
    tools.append(area, save);
  };
  tools.append(up, down, edit);
}
function drawPair() {
  const box = document.getElementById("pair"); box.replaceChildren();
  if (ANSWERS.filter(Boolean).length < 2) return;
  const pick = (id, chosen) => { const s = el("select", {id}); ANSWERS.forEach((a, i) => { if (!a) return; const o = el("option", {value: i}, `${i + 1}: ${a.model}`); if (i === chosen) o.selected = true; s.append(o); }); return s; };
  const message = el("span", {id: "pair-message"});
  box.append(el("h2", {}, "A/B"), labelled("A", pick("pair-a", 0)), labelled("B", pick("pair-b", ANSWERS.length - 1)));
  for (const [label, value, cls] of [["A is better", 0, "a-better"], ["B is better", 1, "b-better"], ["Tie", "tie", "tie"], ["Both bad", "both_bad", "both-bad"]]) {
    const b = el("button", {class: cls}, label);
    b.onclick = () => rate("pair", [ANSWERS[num("pair-a")].id, ANSWERS[num("pair-b")].id], value, message);
    box.append(b, " ");
  }
  box.append(message);
}
async function send(event) {
  event.preventDefault();
  const message = document.getElementById("chat-message"), answers = document.getElementById("answers");
  const models = [...document.querySelectorAll("input.model:checked")].map(c => c.value);
  answers.replaceChildren(); ANSWERS.length = 0; drawPair(); say(message, "answering…");
  const body = {models, prompt: val("prompt"), settings: settings(), formatter: val("base-formatter"), rater: val("rater")};
  const response = await fetch("/api/chat", {method: "POST", headers: {"X-Studio-Token": TOKEN, "Content-Type": "application/json"},
    body: JSON.stringify(body), credentials: "same-origin"});
  if (!response.ok) { const data = await response.json().catch(() => ({error: response.statusText})); say(message, data.error, true); return; }
  const reader = response.body.getReader(), decoder = new TextDecoder(); let buffer = "";
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const e = JSON.parse(line.slice(6));
      let box = answers.querySelector(`.answer[data-column="${e.column}"]`);
      if (e.event === "start") {
        box = answerBox(e.column, e.model); answers.append(box);
        document.getElementById("sampling-shown").textContent = "Same sampling for all: " + Object.entries(e.sampling).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
        box.querySelector("h3").textContent = `${e.model} (${e.formatter || "no formatter"})`;
      } else if (e.event === "token") { box.querySelector(".text").textContent += e.shown; }
      else if (e.event === "done") {
        box.querySelector(".text").textContent = e.shown; box.dataset.done = "1";
        ANSWERS[e.column] = {id: e.id, text: e.answer, model: e.model}; addTools(box, ANSWERS[e.column]); drawPair();
      } else if (e.event === "error") {
        if (!box) { box = answerBox(e.column, e.model); answers.append(box); }
        box.querySelector(".text").textContent = e.error; box.classList.add("error");
      } else if (e.event === "end") { say(message, "done"); }
    }
  }
}
function drawRetrain(box) {
  box.replaceChildren();
  const objective = el("select", {id: "objective"});
  Object.entries(MODELS.objectives).forEach(([k, v]) => objective.append(el("option", {value: k}, `${k}: ${v}`)));
  const versions = MODELS.versions.map(v => v.ref);
  box.append(labelled("objective", objective), labelled("rated version", modelSelect("rated", versions[versions.length - 1])),
    labelled("publish as", input("publish-as", "")), labelled("max steps", input("retrain-max-steps", "", {type: "number", min: 1})),
    labelled("learning rate", input("retrain-lr", "")),
    labelled("other options (JSON, as finetune train's)", input("retrain-extra", "", {placeholder: '{"objective": "orpo", "beta": 0.2}'})), el("br"));
  const check = el("button", {id: "retrain-check"}, "Check the ratings"), go = el("button", {id: "retrain-button"}, "Retrain");
  const out = el("div", {id: "retrain-plan"}), message = el("div", {id: "retrain-message"});
  const file = () => ({kto: val("thumbs-file"), dpo: val("pairs-file"), "reward-grpo": val("pairs-file"), sft: val("edits-file")})[val("objective")];
  check.onclick = async () => { const r = await api("POST", "/api/retrain/plan", {objective: val("objective"), file: file()}); showPlan(out, r); };
  go.onclick = async () => {
    let extra = {};
    try { extra = JSON.parse(val("retrain-extra") || "{}"); } catch (e) { say(message, "other options: not a JSON object (" + e.message + ")", true); return; }
    const options = {...extra, max_steps: num("retrain-max-steps"), learning_rate: val("retrain-lr") || null};
    const r = await api("POST", "/api/retrain", {objective: val("objective"), file: file(), rated: val("rated"), publish_as: val("publish-as"), options});
    if (!r.ok) { say(message, r.data.error, true); return; }
    showPlan(out, {ok: true, data: r.data.plan}); say(message, `run ${r.data.name}: ${r.data.status}`); watchRetrain(r.data.name, val("rated"), message);
  };
  box.append(check, " ", go, out, message);
}
function showPlan(box, r) {
  box.replaceChildren();
  if (!r.ok) { box.append(el("p", {class: "error"}, r.data.error)); return; }
  box.append(el("p", {class: "counts"}, `${r.data.trains}: ` + Object.entries(r.data.counts).map(([k, v]) => `${v} ${k}`).join(", ")));
  r.data.warnings.forEach(w => box.append(el("p", {class: "warning"}, w)));
  if (r.data.error) box.append(el("p", {class: "error"}, r.data.error));
}
async function watchRetrain(name, rated, message) {
  const before = new Set(MODELS.versions.map(v => v.ref));
  for (;;) {
    const r = await api("GET", `/api/runs/${encodeURIComponent(name)}`);
    if (r.ok && ["failed", "interrupted", "stopped"].includes(r.data.status)) { say(message, `run ${name}: ${r.data.status} ${r.data.error || ""}`, true); return; }
    if (r.ok && r.data.status === "finished") {  // the version is published right after the run's end
      await loadModels();
      const fresh = MODELS.versions.filter(v => !before.has(v.ref)).map(v => v.ref);
      if (fresh.length) {
        drawModelList();
        const select = document.getElementById("rated"), keep = select.value;
        select.replaceChildren(...modelRefs().map(m => { const o = el("option", {value: m}, m); o.selected = m === keep; return o; }));
        say(message, `run ${name} finished; new version ${fresh.join(", ")} (parent ${rated}), now in the chat`);
        message.dataset.version = fresh.join(","); return;
      }
    } else if (r.ok) say(message, `run ${name}: ${r.data.status}, step ${r.data.step}`);
    await new Promise(ok => setTimeout(ok, 1000));
  }
}
async function chatPage() {
  await loadModels();
  drawModelChoice(document.getElementById("chat-setup"));
  drawRetrain(document.getElementById("retrain"));
  document.getElementById("chat-form").addEventListener("submit", send);
}

// ---- rating session over a prompts file -------------------------------------------------------------------
async function sessionPage() {
  await loadModels();
  const box = document.getElementById("session-setup");
  const mode = el("select", {id: "mode"}); ["thumbs", "pairwise"].forEach(m => mode.append(el("option", {value: m}, m)));
  box.append(labelled("model", modelSelect("session-model")), labelled("prompts file", input("prompts-file", "prompts.txt")),
    labelled("mode", mode), labelled("ratings file", input("out-file", "thumbs.jsonl")),
    labelled("edits file", input("sft-file", "")), labelled("formatter", input("session-formatter", "")), el("br"));
  // the chat's files by default, so its Retrain reads what a session rated
  const defaults = {thumbs: "thumbs.jsonl", pairwise: "pairs.jsonl"};
  mode.onchange = () => { const out = document.getElementById("out-file");
    if (Object.values(defaults).includes(out.value)) out.value = defaults[mode.value]; };
  settingsFields(box);
  const start = el("button", {id: "session-start"}, "Start / next"); box.append(el("br"), start);
  start.onclick = nextItem;
}
function sessionBody() {
  return {model: val("session-model"), prompts: val("prompts-file"), mode: val("mode"), out: val("out-file"),
    sft_out: val("sft-file") || null, formatter: val("session-formatter") || null, settings: settings(), rater: val("rater") || null};
}
async function nextItem() {
  const box = document.getElementById("session-item"); say(box, "answering…"); box.dataset.item = "";
  const r = await api("POST", "/api/session/next", sessionBody());
  box.replaceChildren(); box.className = "";
  if (!r.ok) { box.append(el("p", {class: "error"}, r.data.error)); return; }
  if (r.data.done) { box.append(el("p", {id: "session-done"}, `every one of the ${r.data.total} prompts is rated`)); return; }
  box.append(el("p", {class: "progress"}, `${r.data.pending} of ${r.data.total} prompts to rate`), el("h3", {class: "prompt"}, r.data.prompt));
  r.data.answers.forEach((a, i) => box.append(el("h4", {}, `answer ${i + 1}`), el("pre", {class: "text"}, a.shown)));
  const ids = r.data.answers.map(a => a.id), message = el("div", {class: "rated"});
  box.dataset.item = ids.join(",");
  const act = (kind, chosen, value) => async () => {
    const ok = await api("POST", "/api/rate", {kind, answers: chosen, value, out: kind === "edit" ? val("sft-file") : val("out-file")});
    if (!ok.ok) { say(message, ok.data.error, true); return; } nextItem();
  };
  const buttons = val("mode") === "thumbs"
    ? [["Thumbs up", "thumb-up", act("thumbs", ids, true)], ["Thumbs down", "thumb-down", act("thumbs", ids, false)]]
    : [["1 is better", "a-better", act("pair", ids, 0)], ["2 is better", "b-better", act("pair", ids, 1)],
       ["Tie", "tie", act("pair", ids, "tie")], ["Both bad", "both-bad", act("pair", ids, "both_bad")]];
  buttons.forEach(([label, cls, fn]) => { const b = el("button", {class: cls}, label); b.onclick = fn; box.append(b, " "); });
  if (val("sft-file")) {
    const area = el("textarea", {class: "edit-text", rows: 3}); area.value = r.data.answers[0].text;
    const save = el("button", {class: "save-edit"}, "Save my answer"); save.onclick = () => act("edit", [ids[0]], area.value)();
    box.append(el("br"), area, save);
  }
  box.append(message);
}

// ---- export and compare ---------------------------------------------------------------------------------------
async function exportPage() {
  await loadModels();
  const results = [...MODELS.versions.map(v => v.ref), ...MODELS.results];
  const quant = el("select", {id: "quantization"}); MODELS.quantizations.forEach(q => quant.append(el("option", {value: q}, q)));
  const form = document.getElementById("export-form"), result = document.getElementById("export-result");
  const pick = (id) => { const s = el("select", {id}); results.forEach(m => s.append(el("option", {value: m}, m))); return s; };
  const go = el("button", {id: "export-button"}, "Export");
  form.append(labelled("version", pick("export-ref")), labelled("quantization", quant), labelled("folder", input("export-out", "exports/model")), go);
  go.onclick = async () => {
    say(result, "exporting…"); const r = await api("POST", "/api/export", {ref: val("export-ref"), quantization: val("quantization"), out: val("export-out")});
    result.replaceChildren(); result.className = "";
    if (!r.ok) { result.append(el("p", {class: "error"}, r.data.error)); return; }
    Object.entries(r.data.files).forEach(([k, p]) => result.append(el("p", {}, `GGUF (${k}): ${p}`)));
    result.append(el("p", {}, "Run it with Ollama:"), el("pre", {id: "ollama-command"}, r.data.ollama_command));
  };
  const cform = document.getElementById("compare-form"), cresult = document.getElementById("compare-result");
  const prompts = el("textarea", {id: "compare-prompts", rows: 3, placeholder: "one prompt per line (answers side by side)"});
  const run = el("button", {id: "compare-button"}, "Compare");
  cform.append(labelled("version", pick("compare-ref")), labelled("held-out data", input("compare-data", "eval.jsonl")),
    labelled("report folder", input("compare-dir", "reports/compare")), el("br"), prompts, el("br"), run);
  run.onclick = async () => {
    say(cresult, "comparing…");
    const r = await api("POST", "/api/compare", {ref: val("compare-ref"), eval_data: val("compare-data"), report_dir: val("compare-dir"), prompts: prompts.value});
    cresult.replaceChildren(); cresult.className = "";
    if (!r.ok) { cresult.append(el("p", {class: "error"}, r.data.error)); return; }
    const metrics = Object.keys(r.data.tuned || {});
    const t = table(["metric", "base", "tuned"], metrics.map(m => [m, fmt(r.data.base[m]), fmt(r.data.tuned[m])])); t.id = "compare-metrics";
    cresult.append(t);
    if (r.data.generations.length) cresult.append(table(["prompt", "base", "tuned"], r.data.generations.map(g => [g.prompt, g.base, g.tuned])));
    cresult.append(el("img", {id: "compare-plot", alt: "loss chart", src: "/api/compare/plot.svg?dir=" + encodeURIComponent(val("compare-dir"))}));
  };
}

// ---- federated and scores ---------------------------------------------------------------------------------------
async function federatedPage() {
  const box = document.getElementById("federated"); const r = await api("GET", "/api/federated");
  if (!r.ok) { say(box, r.data.error, true); return; }
  if (!r.data.length) { box.append(el("p", {class: "empty"}, "No federated results yet (finetune federated ... or Trainer.fit_federated).")); return; }
  for (const run of r.data) {
    const privacy = run.privacy ? `epsilon ${run.privacy.epsilon === null ? "∞ (no noise)" : fmt(run.privacy.epsilon)}, delta ${run.privacy.delta} (after ${run.privacy.releases} releases)` : "off";
    box.append(el("h2", {}, run.ref), el("p", {}, `strategy ${run.strategy}; adapter ${run.adapter_bytes === null ? "—" : formatBytes(run.adapter_bytes)}; differential privacy: ${privacy}`));
    const rows = [];
    const spent = p => !p ? (run.privacy ? "—" : "off") : `ε ${p.epsilon === null ? "∞" : fmt(p.epsilon)}, δ ${p.delta}`;
    for (const round of run.rounds) {
      const ratio = bytes => run.adapter_bytes && bytes !== null && bytes !== undefined ? fmt(bytes / run.adapter_bytes) + "×" : null;
      rows.push([round.round, round.sampled, round.answered, "(all)", null, fmt(round.global_eval_loss), null,
        formatBytes(round.bytes_from_clients), ratio(round.bytes_from_clients), spent(round.privacy)]);
      for (const [name, c] of Object.entries(round.clients))
        rows.push(["", "", "", name, fmt(c.eval_loss), fmt(c.global_eval_loss), fmt(c.train_loss), formatBytes(c.bytes_sent), ratio(c.bytes_sent), ""]);
    }
    const t = table(["round", "sampled", "answered", "client", "held-out loss, own model", "held-out loss, global model", "train loss", "bytes sent", "sent / adapter", "privacy spent"], rows);
    t.className = "federated-rounds"; box.append(t);
  }
}
async function scoresPage() {
  const box = document.getElementById("scoreboard"); const r = await api("GET", "/api/scores");
  if (!r.ok) { say(box, r.data.error, true); return; }
  if (!r.data.length) { box.append(el("p", {class: "empty"}, "No benchmark scores yet: finetune bench NAME@N.")); return; }
  for (const board of r.data) {
    box.append(el("h2", {}, board.name));
    const t = table(["task", "metric", "shots", "model", "value", "± stderr", "vs base", "significant"], board.rows.map(x =>
      [x.task, x.metric, x.num_fewshot, x.model, fmt(x.value), x.stderr === null ? null : fmt(x.stderr), x.vs_base === null ? null : fmt(x.vs_base), x.significant === null ? null : (x.significant ? "yes" : "no")]));
    t.className = "scores"; box.append(t);
  }
}

const LOOP = {chat: chatPage, session: sessionPage, export: exportPage, federated: federatedPage, scores: scoresPage};
if (LOOP[document.body.dataset.page]) LOOP[document.body.dataset.page]();
