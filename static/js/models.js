// The model picker, from GET /v1/models; choosing a model applies its defaults and limits.
// Worker counts follow the cluster panel's polls, so the picker never shows stale ones: when
// the cluster does not answer, they read "unknown".
import { api } from "./api.js";
import { unreachable } from "./cluster.js";
import { $ } from "./dom.js";
import { editMode } from "./editor.js";
import { applyLimits, currentLimits } from "./form.js";
import { parseSize, sizeRule } from "./limits.js";
import { setAdapters } from "./loras.js";
import { plural, sizeText } from "./words.js";

const CHOSEN = "dc-model";  // the last model chosen in this browser
let known = new Map();  // id -> the entry of GET /v1/models; kept when a model's workers go
let serving = new Map();  // id -> {ready, queued}, from the latest cluster status
let clusterError = null;  // why the cluster did not answer its latest poll; null when it did
let listed = false;  // whether GET /v1/models has answered once
let onChange = () => {};

const remembered = () => {
  try {
    return localStorage.getItem(CHOSEN) || "";
  } catch {
    return "";
  }
};

function remember(id) {
  try {
    localStorage.setItem(CHOSEN, id);
  } catch { /* storage blocked: the choice lasts until the page closes */ }
}

function workersOf(id) {
  if (clusterError) return null;
  return serving.get(id) || { ready: 0, queued: 0 };
}

function workersText(id) {
  const workers = workersOf(id);
  if (!workers) return "workers unknown";
  return workers.ready ? plural(workers.ready, "worker") : "no worker ready";
}

/**
 * Why the model cannot do the edit the form holds (an input set, a mask painted), and what
 * would let it; null when it can (or nothing is being edited).
 */
function editProblem(id) {
  const mode = editMode();
  const can = known.get(id)?.capabilities;
  if (!mode || !Array.isArray(can)) return null;
  if (!can.includes("edit")) {
    return { what: "edit", text: `${id} cannot edit images`,
             fix: "choose another model, or remove the input image" };
  }
  if (mode === "inpaint" && !can.includes("inpaint")) {
    return { what: "inpaint", text: `${id} cannot inpaint (edit under a mask)`,
             fix: "clear the mask to edit the whole image, or choose another model" };
  }
  return null;
}

function optionText(id) {
  const family = known.get(id)?.limits.family;
  const cannot = editMode() && editProblem(id) ? "cannot edit" : null;
  return [id, family && family !== id ? family : null, workersText(id), cannot]
    .filter(Boolean).join(" · ");
}

/** What the model takes besides the prompt: "negative prompt, guidance". (Its sizes: the
 * Size field's legend; its default guidance: the Guidance field.) */
export function abilities(limits) {
  const can = [];
  if (limits.negative_prompt) can.push("negative prompt");
  if (limits.default_guidance !== null) can.push("guidance");
  return can.length ? can.join(", ") : "prompt only";
}

function defaultsText(limits) {
  const size = parseSize(limits.default_size);
  return [size ? sizeText(size.width, size.height) : null, plural(limits.default_steps, "step")]
    .filter(Boolean).join(", ");
}

function describe(id) {
  const model = known.get(id);
  const workers = workersOf(id);
  const serves = !workers ? "Workers unknown"
    : [workers.ready ? `${plural(workers.ready, "worker")} ready` : "No worker ready",
       workers.queued ? `${workers.queued} queued` : null].filter(Boolean).join(", ");
  if (!model) {
    $("model-hint").textContent = serves;
    $("model-hint").title = "";
    return;
  }
  const { limits } = model;
  const family = [limits.family, limits.pipeline].filter(Boolean).join(" · ");
  const lines = [`${serves} · ${family}`, `Default ${defaultsText(limits)} · ${abilities(limits)}`];
  if ($("model-hint").innerText !== lines.join("\n")) {
    $("model-hint").replaceChildren(...lines.map(lineOf));
  }
  $("model-hint").title = [limits.description, `sizes: ${sizeRule(limits)}`].filter(Boolean).join("; ");
}

const lineOf = (text) => Object.assign(document.createElement("span"), { textContent: text });

/** Say before Generate is pressed that the chosen model cannot run now, and why. */
function warn() {
  const id = $("model").value;
  const workers = workersOf(id);
  const problem = id ? editProblem(id) : null;
  const text = problem ? `${problem.text}: ${problem.fix}.`
    : !id || !workers || workers.ready ? ""
    : `No worker serves ${id} right now: choose another model, or wait for one to start.`;
  $("model-warning").textContent = text;
  $("model-warning").hidden = !text;
  $("model").setAttribute("aria-invalid", text ? "true" : "false");
}

/** Why Generate cannot work now, in words; null when it can. */
export function generateBlocker() {
  if (clusterError) {
    const why = clusterError.status === 0 ? "the server cannot be reached"
      : `the cluster does not answer (${clusterError.message})`;
    return `Can't generate: ${why}. Trying again every few seconds.`;
  }
  const id = $("model").value;
  if (!listed || !id) return "Can't generate yet: waiting for a model to be ready.";
  const workers = workersOf(id);
  if (workers && !workers.ready) return `Can't generate: no worker serves ${id} right now.`;
  const problem = editProblem(id);
  if (problem) return `Can't ${problem.what}: ${problem.text}; ${problem.fix}.`;
  return null;
}

/** Show the picker's state again (the form's input image changed what it can do). */
export function renderModels() {
  render();
}

function render() {
  const select = $("model");
  for (const option of select.options) {
    const text = option.value ? optionText(option.value) : option.textContent;
    if (option.textContent !== text) option.textContent = text;  // an open list stays open
  }
  describe(select.value);
  warn();
  const model = known.get(select.value);
  setAdapters(select.value, model ? model.loras ?? [] : null);
  onChange();
}

function fillSelect(ids, chosen) {
  const select = $("model");
  const shown = chosen && !ids.includes(chosen) ? [...ids, chosen] : ids;
  select.replaceChildren(...shown.map((id) => new Option(optionText(id), id)));
  if (!shown.length) select.append(new Option("no model is ready yet", ""));
  select.value = chosen || (ids[0] ?? "");
}

/**
 * Load the model list. The first load (or a model appearing for the first time) applies the
 * chosen model's defaults; later loads only refresh worker counts.
 */
export async function loadModels() {
  const body = await api("/v1/models", { background: true });
  let chosen = $("model").value;
  const ids = body.data.map((m) => m.id);
  if (!chosen && ids.includes(remembered())) chosen = remembered();
  for (const model of body.data) known.set(model.id, model);
  if (clusterError === null && !serving.size) {
    serving = new Map(body.data.map((m) => [m.id, { ready: m.ready_workers, queued: m.queued }]));
  }
  listed = true;
  fillSelect(ids, chosen);
  const model = known.get($("model").value);
  if (model && !currentLimits()) applyLimits(model.limits);
  render();
  return body.data;
}

/** A cluster poll's answer (or its failure): worker counts and queues for every model. */
export function clusterChanged(status, err) {
  clusterError = unreachable(err) ? err : null;
  if (status) {
    const next = new Map();
    for (const worker of status.workers) {
      if (worker.state !== "ready") continue;
      for (const id of worker.models) {
        const entry = next.get(id) || { ready: 0, queued: status.queues[id] || 0 };
        entry.ready += 1;
        next.set(id, entry);
      }
    }
    for (const [id, depth] of Object.entries(status.queues)) {
      if (!next.has(id)) next.set(id, { ready: 0, queued: depth });
    }
    const appeared = [...next.keys()].some((id) => next.get(id).ready && !known.has(id));
    serving = next;
    if (appeared && listed) loadModels().catch(() => {});  // learn the new model's limits
  }
  render();
}

/** Choose a model (from the picker or restored settings); defaults apply when it changes. */
export function chooseModel(id, { defaults = true } = {}) {
  const select = $("model");
  if (![...select.options].some((o) => o.value === id)) select.append(new Option(id, id));
  select.value = id;
  remember(id);
  const model = known.get(id);
  if (model) applyLimits(model.limits, { defaults });
  render();
  return Boolean(model);
}

export function initModels({ changed = () => {} } = {}) {
  onChange = changed;
  $("model").addEventListener("change", () => chooseModel($("model").value));
}
