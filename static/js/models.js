// The model picker, from GET /v1/models; choosing a model applies its defaults and limits.
import { api } from "./api.js";
import { $ } from "./dom.js";
import { applyLimits, currentLimits } from "./form.js";
import { plural } from "./words.js";

let models = new Map();  // id -> the entry of GET /v1/models

function optionText(model) {
  const workers = model.ready_workers ? plural(model.ready_workers, "worker")
                                      : "no worker ready";
  return `${model.id} · ${workers}`;
}

function describe(model) {
  const { limits } = model;
  const about = limits.description || [limits.family, limits.pipeline].filter(Boolean).join(" · ");
  $("model-hint").textContent = model.queued ? `${model.queued} queued · ${about}` : about;
  $("model-hint").title = about;
}

function fillSelect(list, chosen) {
  const select = $("model");
  select.replaceChildren(...list.map((m) => new Option(optionText(m), m.id)));
  if (chosen && !models.has(chosen)) {
    select.append(new Option(`${chosen} · not served right now`, chosen));
  }
  if (!list.length && !chosen) select.append(new Option("no model is ready yet", ""));
  select.value = chosen || (list[0] ? list[0].id : "");
}

/**
 * Load the model list. The first load (or a model appearing for the first time) applies the
 * chosen model's defaults; later loads only refresh worker counts.
 */
export async function loadModels() {
  const body = await api("/v1/models", { background: true });
  const chosen = $("model").value;
  models = new Map(body.data.map((m) => [m.id, m]));
  fillSelect(body.data, chosen);
  const model = models.get($("model").value);
  if (model) {
    if (!currentLimits()) applyLimits(model.limits);
    describe(model);
  }
  return body.data;
}

/** Choose a model (from the picker or restored settings); defaults apply when it changes. */
export function chooseModel(id, { defaults = true } = {}) {
  const select = $("model");
  if (![...select.options].some((o) => o.value === id)) {
    select.append(new Option(`${id} · not served right now`, id));
  }
  select.value = id;
  const model = models.get(id);
  if (model) {
    applyLimits(model.limits, { defaults });
    describe(model);
  }
  return Boolean(model);
}

export function initModels() {
  $("model").addEventListener("change", () => chooseModel($("model").value));
}
