// The history panel: past generations, searchable by prompt; clicking one restores its settings.
import { $, el, toast } from "./dom.js";
import { writeSettings } from "./form.js";
import { filename } from "./images.js";
import { openLightbox } from "./lightbox.js";
import { chooseModel } from "./models.js";
import { allEntries, clearEntries, deleteEntry, putEntry } from "./store.js";
import { plural, sizeText, timeAgo } from "./words.js";

const PAGE = 30;
let shown = PAGE;
let urls = [];  // object URLs of the rendered thumbnails, revoked on the next render

/** Keep a finished generation: its settings as sent, what the server did, and the images. */
export async function addToHistory(settings, response, images) {
  const entry = {
    id: response.job_id || `local-${Date.now()}-${Math.random().toString(36).slice(2)}`,
    created: Date.now(),
    settings: { ...settings },
    result: {
      model: response.model, width: response.width, height: response.height,
      steps: response.steps, guidance: response.guidance ?? null,
      output_format: response.output_format,
    },
    images: images.map(({ blob, seed, width, height, format }) => ({ blob, seed, width, height, format })),
  };
  try {
    await putEntry(entry);
  } catch (err) {
    toast(`Could not save to history: ${err.message || "storage is full or blocked"}`);
  }
  await renderHistory();
}

/** The settings that make this entry again: what the server used, with the first image's seed. */
function settingsOf(entry) {
  const { result, settings } = entry;
  return {
    ...settings, model: result.model, width: result.width, height: result.height,
    steps: result.steps, guidance: result.guidance ?? settings.guidance,
    output_format: result.output_format || settings.output_format,
    seed: entry.images[0] ? entry.images[0].seed : settings.seed,
  };
}

function restore(entry) {
  const settings = settingsOf(entry);
  const served = chooseModel(settings.model, { defaults: false });
  writeSettings(settings);
  toast(served ? "Settings restored" : `Settings restored; ${settings.model} is not served right now`);
  $("prompt").focus();
}

function metaText(entry) {
  const { result, images } = entry;
  const seeds = images.length > 1 ? `seeds ${images[0].seed}–${images[images.length - 1].seed}`
                                  : `seed ${images[0]?.seed}`;
  return [result.model, sizeText(result.width, result.height), plural(result.steps, "step"),
          result.guidance === null ? null : `guidance ${result.guidance}`, seeds,
          (result.output_format || "png").toUpperCase(), timeAgo(entry.created)]
    .filter(Boolean).join(" · ");
}

function entryItem(entry) {
  const items = entry.images.map((image) => {
    const url = URL.createObjectURL(image.blob);
    urls.push(url);
    return { ...image, url, prompt: entry.settings.prompt,
             filename: filename(entry.settings.prompt, image.seed, image.format) };
  });
  const thumbs = items.slice(0, 4).map((item, index) => el("button", {
    type: "button", class: "entry-thumb", onclick: () => openLightbox(items, index),
    "aria-label": `Open image with seed ${item.seed} full size`,
  }, el("img", { src: item.url, alt: "", width: item.width, height: item.height })));
  const negative = entry.settings.negative_prompt?.trim();
  return el("li", { class: "entry", dataset: { id: entry.id } },
    el("div", { class: "entry-thumbs" }, thumbs,
       items.length > 4 ? el("span", { class: "entry-more" }, `+${items.length - 4}`) : null),
    el("button", { type: "button", class: "entry-restore", onclick: () => restore(entry),
                   title: "Restore these settings" },
      el("span", { class: "entry-prompt" }, entry.settings.prompt),
      negative ? el("span", { class: "entry-negative" }, `Not: ${negative}`) : null,
      el("span", { class: "entry-meta" }, metaText(entry))),
    el("button", { type: "button", class: "entry-delete quiet", "aria-label": "Delete from history",
                   title: "Delete from history", onclick: () => remove(entry.id) }, "×"));
}

async function remove(id) {
  await deleteEntry(id);
  await renderHistory();
}

function matches(entry, words) {
  const prompt = entry.settings.prompt.toLowerCase();
  return words.every((word) => prompt.includes(word));
}

export async function renderHistory() {
  let entries;
  try {
    entries = await allEntries();
  } catch {
    $("history-note").textContent = "History is not available in this browser window.";
    return;
  }
  const words = $("history-search").value.toLowerCase().split(/\s+/).filter(Boolean);
  const found = entries.filter((entry) => matches(entry, words));
  urls.forEach((url) => URL.revokeObjectURL(url));
  urls = [];
  $("history-list").replaceChildren(...found.slice(0, shown).map(entryItem));
  $("history-note").textContent = !entries.length ? "Generations you make are kept here, in this browser."
    : words.length ? `${found.length} of ${plural(entries.length, "generation")} match.`
    : plural(entries.length, "generation");
  $("history-more").hidden = found.length <= shown;
  $("history-clear").hidden = !entries.length;
}

export function initHistory() {
  $("history-search").addEventListener("input", () => {
    shown = PAGE;
    renderHistory();
  });
  $("history-more").addEventListener("click", () => {
    shown += PAGE;
    renderHistory();
  });
  $("history-clear").addEventListener("click", async () => {
    if (!confirm("Delete every generation in the history of this browser?")) return;
    await clearEntries();
    await renderHistory();
  });
  return renderHistory();
}
