// One job in the history panel: thumbnails by URL, prompt, settings, status and its buttons.
import { confirmDelete } from "./confirm.js";
import { el } from "./dom.js";
import { editKind, editOf } from "./edits.js";
import { filename } from "./images.js";
import { ACTIVE } from "./jobs.js";
import { parseSize } from "./limits.js";
import { appliedLoras, lorasText } from "./loras.js";
import { plural, sizeText, timeAgo } from "./words.js";

const SHOWN_THUMBS = 4;

/** The adapters a job applied: its request's `loras` and its prompt's <lora:...> tags. */
const lorasOf = (job) => appliedLoras(job.request?.loras, job.request?.prompt);

/**
 * The settings that make this job again: what the server used, with its first seed. The
 * prompt is the server's, without <lora:...> tags: those adapters go to the form's list.
 */
export function settingsOf(job) {
  const request = job.request || {};
  const size = parseSize(request.size || "");
  return {
    prompt: job.prompt ?? request.prompt, negative_prompt: job.negative_prompt ?? "",
    model: job.model, width: job.width ?? size?.width, height: job.height ?? size?.height,
    steps: job.steps ?? request.steps, guidance: job.guidance ?? request.guidance,
    n: job.n || request.n, output_format: job.output_format || request.output_format,
    output_compression: request.output_compression,
    previews: "partial_images" in request ? request.partial_images > 0 : undefined,
    seed: job.seeds.length ? job.seeds[0] : request.seed ?? null,
    edit: editOf(job), loras: lorasOf(job),
  };
}

/** The images a job shows: {url, seed, width, height, filename, prompt}, stored ones only. */
export function imagesOf(job) {
  const prompt = job.prompt || "";
  return job.images.filter((image) => image.url).map((image) => ({
    ...image, prompt, filename: filename(prompt, image.seed, job.output_format || "png"),
  }));
}

function seedsText(seeds) {
  if (seeds.length > 1) return `seeds ${seeds[0]}–${seeds[seeds.length - 1]}`;
  return seeds.length ? `seed ${seeds[0]}` : null;
}

function metaText(job) {
  const loras = lorasText(lorasOf(job));
  return [editKind(editOf(job)), job.model, sizeText(job.width, job.height), plural(job.steps, "step"),
          job.guidance === null ? null : `guidance ${job.guidance}`, loras ? `LoRA ${loras}` : null,
          seedsText(job.seeds),
          (job.output_format || "png").toUpperCase(), timeAgo(job.created * 1000)]
    .filter(Boolean).join(" · ");
}

function statusText(job) {
  if (job.status === "queued") {
    return job.position ? `Queued — ${plural(job.position, "job")} ahead` : "Queued";
  }
  if (job.status === "running") return job.step ? `Running — step ${job.step} of ${job.steps}`
                                                : "Running";
  if (job.status === "failed") return `Failed: ${job.error?.message || "the job failed"}`;
  if (job.status === "cancelled") return "Cancelled";
  if (job.images.some((image) => !image.url)) return "Images not kept on the server";
  return null;
}

function thumbs(job, onOpen) {
  const items = imagesOf(job);
  const buttons = items.slice(0, SHOWN_THUMBS).map((item, index) => el("button", {
    type: "button", class: "entry-thumb", onclick: () => onOpen(items, index),
    "aria-label": `Open image with seed ${item.seed} full size`,
  }, el("img", { src: item.url, alt: "", width: item.width, height: item.height,
                 loading: "lazy", decoding: "async" })));
  const more = items.length > SHOWN_THUMBS
    ? el("span", { class: "entry-more" }, `+${items.length - SHOWN_THUMBS}`) : null;
  return el("div", { class: "entry-thumbs" }, inputThumb(job), buttons, more);
}

/** The input of an edit, small and marked "in", before what was made of it. */
function inputThumb(job) {
  const edit = editOf(job);
  if (!edit?.url) return null;
  return el("span", { class: "entry-input", title: `Input image (${editKind(edit)})` },
    el("img", { src: edit.url, alt: "Input image", loading: "lazy", decoding: "async" }));
}

/** Ask in the entry before deleting, as a run card does: the images go for good. */
function askDelete(node, job, actions) {
  confirmDelete(node.querySelector(".entry-actions"), {
    kind: "entry", question: "Delete this job and its images from the server?",
    // The list drops the entry once the job is gone; it stays when the delete failed.
    remove: async () => {
      await actions.onDelete(job);
      return !node.isConnected;
    },
  });
}

/** The list item for a job; actions: {onOpen, onRestore, onWatch, onCancel, onDelete}. */
export function entryNode(job, actions) {
  const active = ACTIVE.includes(job.status);
  const status = statusText(job);
  const negative = job.negative_prompt?.trim();
  const buttons = active ? [
    el("button", { type: "button", class: "quiet entry-watch", title: "Follow it live above",
                   onclick: () => actions.onWatch(job) }, "Watch"),
    el("button", { type: "button", class: "quiet entry-cancel",
                   onclick: () => actions.onCancel(job) }, "Cancel"),
  ] : [
    el("button", { type: "button", class: "entry-delete quiet", "aria-label": "Delete from history",
                   title: "Delete from history and the server",
                   onclick: () => askDelete(node, job, actions) }, "×"),
  ];
  const node = el("li", { class: "entry", dataset: { id: job.id, status: job.status } },
    thumbs(job, actions.onOpen),
    el("button", { type: "button", class: "entry-restore", onclick: () => actions.onRestore(job),
                   title: "Restore these settings" },
      el("span", { class: "entry-prompt" }, job.prompt ?? "(prompt not kept)"),
      negative ? el("span", { class: "entry-negative" }, `Not: ${negative}`) : null,
      el("span", { class: "entry-meta" }, metaText(job)),
      status ? el("span", { class: "entry-status" }, status) : null),
    el("div", { class: "entry-actions" }, buttons));
  return node;
}
