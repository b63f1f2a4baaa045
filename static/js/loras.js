// LoRA adapters: the chosen model's (from GET /v1/models' `loras`), the ones picked for the next
// run with their weights, and how a request names them: its `loras` field, and the
// <lora:NAME:SCALE> tags Automatic1111 and SwarmUI users type into a prompt (the server takes
// those out of the prompt and applies them just the same).
import { $, el, toast } from "./dom.js";

export const MAX_LORAS = 8;  // the server's limit on adapters at once
export const MAX_SCALE = 4;  // |scale| the server takes; the slider spans the useful part
const SLIDER = { min: -2, max: 2, step: 0.05 };
// As the server reads them: a name without "<", ">" or ":", an optional scale.
const TAG = /<lora:([^<>:]{1,200})(?::([^<>:]{1,32}))?>/g;

let chosen = [];  // [{name, scale}], in the order they were added
let available = null;  // the chosen model's adapters; null while it is unknown
let modelId = null;  // whose adapters `available` lists
let onChange = () => {};

/** "0.5", "1", "-0.25": a scale as a person reads it (no float noise from the slider). */
export const scaleText = (scale) => String(Number(Number(scale).toFixed(2)));

/** "ink 0.8, styles/pastel 1"; "" for none. */
export const lorasText = (loras) => loras.map((l) => `${l.name} ${scaleText(l.scale)}`).join(", ");

/** The adapters a prompt names as tags (scale 1 when left out; NaN when not a number). */
export function promptLoras(prompt) {
  return [...(prompt || "").matchAll(TAG)].map(([, name, scale]) => ({
    name: name.trim(), scale: scale === undefined ? 1 : Number(scale.trim() || NaN),
  }));
}

/** A request's `loras` as {name, scale} (scale 1 when left out), its malformed items dropped. */
export function requestLoras(field) {
  if (!Array.isArray(field)) return [];
  return field.filter((item) => item && typeof item.name === "string" && item.name.trim())
    .map((item) => ({ name: item.name.trim(),
                      scale: typeof item.scale === "number" ? item.scale : 1 }));
}

/** Every adapter a request applies: its `loras`, then its prompt's tags. */
export const appliedLoras = (field, prompt) => [...requestLoras(field), ...promptLoras(prompt)];

/** The adapters picked in the form, for the request's `loras`. */
export const chosenLoras = () => chosen.map(({ name, scale }) => ({ name, scale }));

/** Put adapters (restored settings, a saved draft) into the form; others are removed. */
export function writeLoras(loras) {
  chosen = requestLoras(loras).slice(0, MAX_LORAS);
  $("lora-note").textContent = "";
  render();
}

/**
 * The chosen model's adapters (null: not known, as for a model no worker serves). Another
 * model drops the adapters it lacks, and says so; the same model's list only refreshes.
 */
export function setAdapters(id, names) {
  const switched = modelId !== null && id !== modelId;
  modelId = id;
  const next = Array.isArray(names) ? [...names].sort() : null;
  if (JSON.stringify(next) === JSON.stringify(available) && !switched) return;
  available = next;
  if (switched && available) {
    const dropped = chosen.filter((l) => !available.includes(l.name));
    $("lora-note").textContent = "";
    if (dropped.length) {
      chosen = chosen.filter((l) => available.includes(l.name));
      const text = `${dropped.map((l) => l.name).join(", ")} removed: ${id} has no such adapter.`;
      $("lora-note").textContent = text;
      toast(`Adapter${dropped.length > 1 ? "s" : ""} ${text}`);
      onChange();
    }
  }
  render();
}

function rowOf({ name, scale }, index) {
  const missing = available && !available.includes(name);
  const slider = el("input", {
    type: "range", class: "lora-slider", id: `lora-slider-${index}`, min: SLIDER.min,
    max: SLIDER.max, step: SLIDER.step, value: scale, "aria-label": `${name} weight`,
  });
  const number = el("input", {
    type: "number", class: "lora-scale", id: `lora-scale-${index}`, min: -MAX_SCALE,
    max: MAX_SCALE, step: SLIDER.step, inputmode: "decimal", value: scaleText(scale),
    "aria-label": `${name} weight (${-MAX_SCALE} to ${MAX_SCALE})`,
  });
  slider.addEventListener("input", () => {
    chosen[index].scale = Number(slider.value);
    number.value = scaleText(slider.value);
  });
  number.addEventListener("input", () => {
    const text = number.value.trim();
    chosen[index].scale = text === "" ? NaN : Number(text);
    if (Number.isFinite(chosen[index].scale)) slider.value = chosen[index].scale;
  });
  const remove = el("button", {
    type: "button", class: "quiet lora-remove", title: `Remove ${name}`,
    "aria-label": `Remove adapter ${name}`, onclick: () => removeAt(index),
  }, "×");
  return el("li", { class: "lora", dataset: { name, missing: Boolean(missing) } },
    el("span", { class: "lora-name", title: missing ? `${name}: no worker of this model has it now`
                                                    : name }, name),
    slider, number, remove);
}

function removeAt(index) {
  const wasFocused = $("lora-list").contains(document.activeElement);
  chosen.splice(index, 1);
  render();
  onChange();
  if (wasFocused) ($("lora-list").querySelectorAll(".lora-remove")[index] ?? $("lora-pick")).focus();
}

function add() {
  const name = $("lora-pick").value;
  if (!name || chosen.length >= MAX_LORAS || chosen.some((l) => l.name === name)) return;
  chosen.push({ name, scale: 1 });
  $("lora-note").textContent = "";
  render();
  onChange();
  $(`lora-slider-${chosen.length - 1}`)?.focus();
}

function render() {
  const names = available || [];
  const left = names.filter((name) => !chosen.some((l) => l.name === name));
  const pick = $("lora-pick");
  const kept = pick.value;
  pick.replaceChildren(...left.map((name) => new Option(name, name)));
  if (left.includes(kept)) pick.value = kept;
  const full = chosen.length >= MAX_LORAS;
  $("lora-add").hidden = !left.length;
  pick.disabled = full;
  $("lora-add-button").disabled = full;
  $("lora-list").replaceChildren(...chosen.map(rowOf));
  $("lora-list").hidden = !chosen.length;
  const none = available !== null && !names.length;
  $("lora-none").hidden = !none;
  $("lora-none").textContent = modelId ? `None for ${modelId}.` : "None for this model.";
  $("lora-hint").hidden = !names.length;
  $("lora-limit").textContent = full ? `· ${MAX_LORAS} at most` : "";
  renderPromptTags();
}

/** Say which adapters the prompt's own tags apply, and warn of one picked here too. */
export function renderPromptTags() {
  const tagged = promptLoras($("prompt").value);
  const twice = tagged.filter((t) => chosen.some((l) => l.name === t.name));
  $("lora-tags").hidden = !tagged.length;
  $("lora-tags").textContent = !tagged.length ? ""
    : `From the prompt's tags: ${tagged.map((t) => `${t.name} ${Number.isFinite(t.scale)
      ? scaleText(t.scale) : "?"}`).join(", ")}` +
      (twice.length ? ` — ${twice.map((t) => t.name).join(", ")} is also picked here: remove one.`
                    : "");
}

/** Problems with the adapters' weights, as {param: message}; shown at their inputs. */
export function loraProblems(settings) {
  const problems = {};
  (settings.loras || []).forEach((lora, index) => {
    if (!Number.isFinite(lora.scale) || Math.abs(lora.scale) > MAX_SCALE) {
      problems[`loras[${index}].scale`] = `${lora.name}'s weight is a number from ${-MAX_SCALE} to ${MAX_SCALE}.`;
    }
  });
  const picked = new Set((settings.loras || []).map((l) => l.name));
  const twice = promptLoras(settings.prompt).filter((t) => picked.has(t.name));
  if (twice.length) {
    problems.prompt = `The prompt's tag <lora:${twice[0].name}> names an adapter also picked ` +
      "under Adapters: remove one of them.";
  }
  return problems;
}

/** The form's input about a request field of the adapters (loras, loras[1].scale); or null. */
export function loraInput(field) {
  const at = /^loras\[(\d+)\]/.exec(field);
  if (at && $(`lora-scale-${at[1]}`)) return $(`lora-scale-${at[1]}`);
  return field === "loras" || at ? $("lora-pick") : null;
}

export function initLoras({ changed = () => {} } = {}) {
  onChange = changed;
  $("lora-add-button").addEventListener("click", add);
  render();
}
