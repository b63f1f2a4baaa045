// The settings form: reading and writing settings, a model's defaults, size presets, field errors,
// and the Generate button's state (busy while a job is sent; blocked, with the reason, when no
// job could run).
import { $, el } from "./dom.js";
import { parseSize, settingsProblems, sizePresets, sizeRule } from "./limits.js";
import { chosenLoras, initLoras, loraInput, loraProblems, lorasText, renderPromptTags, writeLoras }
  from "./loras.js";
import { sizeText } from "./words.js";

const DRAFT = "dc-draft";
const MORE_OPEN = "dc-more-settings";  // whether "More settings" was left open
const BUSY_AT_LEAST_MS = 600;  // a job accepted in 10 ms still shows that the press did something
let limits = null;  // the chosen model's limits, from GET /v1/models
let blocked = null;  // why Generate cannot work now, or null
let busySince = 0;  // when the latest job began to be sent; 0 when none is being sent

/** Which input shows a problem with each request field. */
const FIELD_INPUTS = {
  prompt: "prompt", negative_prompt: "negative_prompt", model: "model", size: "width",
  width: "width", height: "height", steps: "steps", guidance: "guidance", n: "n",
  seed: "seed", output_format: "output_format", output_compression: "output_compression",
  partial_images: "previews", strength: "strength", image: "input-file", mask: "input-file",
};

export const currentLimits = () => limits;

/** The input that shows a problem with a request field (an adapter's weight too), or null. */
const inputFor = (field) => (FIELD_INPUTS[field] ? $(FIELD_INPUTS[field]) : loraInput(field));

const numberOf = (id) => {
  const text = $(id).value.trim();
  return text === "" ? NaN : Number(text);
};

export function readSettings() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value,
    width: numberOf("width"),
    height: numberOf("height"),
    steps: numberOf("steps"),
    guidance: numberOf("guidance"),
    n: numberOf("n"),
    output_format: $("output_format").value,
    output_compression: numberOf("output_compression"),
    seed: $("seed-fixed").checked ? numberOf("seed") : null,
    previews: $("previews").checked,
    loras: chosenLoras(),
  };
}

/** The JSON body of POST /v1/jobs (and /v1/images/generations) for these settings. */
export function requestBody(settings, modelLimits = limits) {
  const body = {
    prompt: settings.prompt, model: settings.model, n: settings.n,
    size: `${settings.width}x${settings.height}`, steps: settings.steps,
    output_format: settings.output_format,
  };
  if (settings.output_format !== "png") body.output_compression = settings.output_compression;
  if (modelLimits && modelLimits.default_guidance !== null) body.guidance = settings.guidance;
  if (modelLimits && modelLimits.negative_prompt && settings.negative_prompt.trim()) {
    body.negative_prompt = settings.negative_prompt;
  }
  if (settings.seed !== null) body.seed = settings.seed;
  if (settings.loras?.length) body.loras = settings.loras.map(({ name, scale }) => ({ name, scale }));
  return body;
}

/** Put settings (from history or a saved draft) into the form. */
export function writeSettings(settings) {
  const set = (id, value) => {
    if (value !== undefined && value !== null && !Number.isNaN(value)) $(id).value = value;
  };
  set("prompt", settings.prompt);
  set("negative_prompt", settings.negative_prompt);
  set("width", settings.width);
  set("height", settings.height);
  set("steps", settings.steps);
  set("guidance", settings.guidance);
  set("n", settings.n);
  set("output_format", settings.output_format);
  set("output_compression", settings.output_compression);
  if (settings.previews !== undefined) $("previews").checked = settings.previews;
  if (settings.loras !== undefined) writeLoras(settings.loras);
  if (settings.seed === null) $("seed-random").checked = true;
  else useSeed(settings.seed, { quiet: true });
  refreshDependents();
  saveDraft();
}

export function useSeed(seed, { quiet = false } = {}) {
  $("seed").value = seed;
  $("seed-fixed").checked = true;
  refreshDependents();
  if (!quiet) $("seed").focus();
}

/** Apply a model's limits; with defaults, also its default size, steps and guidance. */
export function applyLimits(modelLimits, { defaults = true } = {}) {
  limits = modelLimits;
  if (defaults) {
    const size = parseSize(limits.default_size);
    if (size) {
      $("width").value = size.width;
      $("height").value = size.height;
    }
    $("steps").value = limits.default_steps;
    $("guidance").value = limits.default_guidance ?? "";
  }
  $("steps").max = limits.max_steps || "";
  $("guidance-field").hidden = limits.default_guidance === null;
  $("negative-field").hidden = !limits.negative_prompt;
  const multiple = limits.size_multiple || 1;
  $("width").step = multiple;
  $("height").step = multiple;
  $("size-rule").textContent = `· ${sizeRule(limits)}`;
  renderPresets();
  summarizeMore();
  clearProblems();
}

function renderPresets() {
  const presets = sizePresets(limits);
  const chips = presets.flatMap((preset, index) => {
    const id = `preset-${index}`;
    const scale = 18 / Math.max(preset.width, preset.height);
    const glyph = el("span", { class: "ratio-glyph", "aria-hidden": "true" });
    glyph.style.width = `${Math.round(preset.width * scale)}px`;
    glyph.style.height = `${Math.round(preset.height * scale)}px`;
    return [
      el("input", { type: "radio", name: "size-preset", id, value: `${preset.width}x${preset.height}` }),
      el("label", { for: id, class: "chip", title: `${preset.ratio}, ${sizeText(preset.width, preset.height)}` },
         glyph, el("span", { class: "chip-name" }, preset.label),
         el("span", { class: "chip-size" }, sizeText(preset.width, preset.height))),
    ];
  });
  $("size-presets").replaceChildren(...chips);
  syncPreset();
}

/** Check the preset chip that matches the typed size, if any. */
function syncPreset() {
  const value = `${$("width").value}x${$("height").value}`;
  for (const radio of $("size-presets").querySelectorAll("input")) radio.checked = radio.value === value;
}

/** Show or hide what depends on other fields: quality, the seed input, the preset chip. */
function refreshDependents() {
  $("quality-field").hidden = $("output_format").value === "png";
  $("seed").classList.toggle("muted", $("seed-random").checked);
  syncPreset();
  renderPromptTags();
  summarizeMore();
}

/** What "More settings" holds that is not the default, so a closed section hides nothing. */
function summarizeMore() {
  const format = $("output_format").value;
  const set = [
    !$("negative-field").hidden && $("negative_prompt").value.trim() ? "negative prompt" : null,
    format === "png" ? null : `${format.toUpperCase()} ${$("output_compression").value}%`,
    chosenLoras().length ? `LoRA ${lorasText(chosenLoras())}` : null,
  ].filter(Boolean);
  $("more-summary").textContent = set.length ? `· ${set.join(", ")}` : "";
}

function initMore() {
  const more = $("more-settings");
  try {
    more.open = localStorage.getItem(MORE_OPEN) === "open";
  } catch { /* storage blocked: closed */ }
  more.addEventListener("toggle", () => {
    try {
      localStorage.setItem(MORE_OPEN, more.open ? "open" : "closed");
    } catch { /* storage blocked */ }
  });
}

/** Why Generate cannot work now (shown next to it), or null when it can. */
export function blockGenerate(reason) {
  blocked = reason || null;
  renderGo();
}

export const generateBlocked = () => blocked;

/** Show that a job is being sent, until accepted() is called (and at least a moment). */
export function generateBusy() {
  const since = performance.now();
  busySince = since;
  renderGo();
  return function accepted() {
    const left = BUSY_AT_LEAST_MS - (performance.now() - since);
    setTimeout(() => {
      if (busySince !== since) return;  // a newer job is being sent
      busySince = 0;
      renderGo();
    }, Math.max(0, left));
  };
}

function renderGo() {
  const go = $("go");
  const busy = Boolean(busySince);
  go.setAttribute("aria-disabled", String(Boolean(blocked)));
  go.setAttribute("aria-busy", String(busy));
  $("go-label").textContent = busy ? "Generating…" : "Generate";
  // Written only when it changes: it is a status region, read out on every change.
  const reason = $("go-reason");
  if (reason.textContent !== (blocked || "")) reason.textContent = blocked || "";
  reason.hidden = !blocked;
}

/** Problems with the current settings; shows them at their fields and focuses the first. */
export function checkSettings(settings) {
  clearProblems();
  if (!limits) {
    showProblem("model", "No model is ready yet: wait until a worker has started.");
    return { model: true };
  }
  const problems = { ...loraProblems(settings), ...settingsProblems(settings, limits) };
  if (settings.edit) delete problems.size;  // an edit has its input's size, fitted by the server
  const fields = Object.keys(problems);
  fields.forEach((field) => showProblem(field, problems[field]));
  if (fields.length) inputFor(fields[0]).focus();
  return problems;
}

/** Show a problem at its field; false when no field of the form is about it. */
export function showProblem(field, message) {
  const input = inputFor(field);
  if (!input) return false;
  const more = input.closest("details");
  if (more) more.open = true;
  const box = input.closest(".field");
  let note = box.querySelector(".field-error");
  if (!note) {
    note = el("p", { class: "field-error", id: `${input.id}-error` });
    box.append(note);
  }
  note.textContent = message;
  const inputs = field === "size" ? [$("width"), $("height")] : [input];
  for (const each of inputs) {
    each.setAttribute("aria-invalid", "true");
    each.setAttribute("aria-describedby", note.id);
  }
  return true;
}

function clearProblems() {
  for (const note of document.querySelectorAll("#generate .field-error")) note.remove();
  for (const input of document.querySelectorAll("#generate [aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("aria-describedby");
  }
}

function saveDraft() {
  const draft = { ...readSettings(), seed: numberOf("seed"), seedFixed: $("seed-fixed").checked };
  try {
    localStorage.setItem(DRAFT, JSON.stringify(draft));
  } catch { /* storage full or blocked: the draft is a convenience */ }
}

/** The settings last typed in this browser, or null. */
export function savedDraft() {
  try {
    const draft = JSON.parse(localStorage.getItem(DRAFT));
    if (!draft) return null;
    if (!draft.seedFixed) {
      $("seed").value = Number.isFinite(draft.seed) ? draft.seed : "";
      draft.seed = null;
    }
    return draft;
  } catch {
    return null;
  }
}

export function initForm({ onSubmit }) {
  const form = $("generate");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    onSubmit();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      onSubmit();
    }
  });
  // On "input", which reaches this list before the form's own listener syncs the chips.
  $("size-presets").addEventListener("input", (event) => {
    const size = parseSize(event.target.value);
    $("width").value = size.width;
    $("height").value = size.height;
    clearProblemAt("width");
  });
  $("seed").addEventListener("input", () => { $("seed-fixed").checked = true; });
  $("seed-fixed").addEventListener("click", (event) => {
    if (event.detail) $("seed").focus();  // a pointer click; arrow keys stay in the radio group
  });
  form.addEventListener("input", (event) => {
    clearProblemAt(event.target.id);
    refreshDependents();
    clearTimeout(saveDraft.timer);
    saveDraft.timer = setTimeout(saveDraft, 300);
  });
  form.addEventListener("change", refreshDependents);
  if (/Mac|iPhone|iPad/.test(navigator.platform)) {
    $("prompt-hint").querySelector("kbd").textContent = "⌘";
  }
  initLoras({ changed: () => {
    refreshDependents();
    saveDraft();
  } });
  initMore();
  refreshDependents();
  renderGo();
}

function clearProblemAt(id) {
  const input = $(id);
  if (!input || !input.closest) return;
  const box = input.closest(".field");
  if (!box) return;
  box.querySelector(".field-error")?.remove();
  for (const each of box.querySelectorAll("[aria-invalid]")) {
    each.removeAttribute("aria-invalid");
    each.removeAttribute("aria-describedby");
  }
}
