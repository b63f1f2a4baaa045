// One generation on screen: its settings, progress, previews, and then its images or error,
// with what can be done next (retry, re-run, vary, restore, copy settings, delete).
import { confirmDelete } from "./confirm.js";
import { el } from "./dom.js";
import { editKind } from "./edits.js";
import { resultFigure } from "./images.js";
import { appliedLoras, lorasText } from "./loras.js";
import { plural, seconds, sizeText } from "./words.js";

function seedText(seeds, requested) {
  if (seeds && seeds.length > 1) return `seeds ${seeds[0]}–${seeds[seeds.length - 1]}`;
  if (seeds && seeds.length) return `seed ${seeds[0]}`;
  return requested === null ? "random seed" : `seed ${requested}`;
}

/** "about 40 s", "about 3 min"; null when the server does not know. */
export function etaText(eta) {
  // Past a day an estimate says nothing (the server sends none; a wrong one is left out too).
  if (typeof eta !== "number" || !Number.isFinite(eta) || eta < 0 || eta > 86400) return null;
  if (eta < 1) return "starting any moment";
  return eta < 90 ? `about ${Math.round(eta)} s` : `about ${Math.round(eta / 60)} min`;
}

/** "Queued — 2 jobs ahead · about 40 s", from the server's position and estimate. */
export function queuedText(position, eta) {
  const where = position === null || position === undefined ? ""
    : position === 0 ? " — next in line" : ` — ${plural(position, "job")} ahead`;
  const wait = etaText(eta);
  return `Queued${where}${wait ? ` · ${wait}` : ""}`;
}

/** "2 images · waited 3.1 s · made in 20 s"; times in ms, null when not known. */
export function doneText(count, { waited = null, made = null, total = null }) {
  const parts = [plural(count, "image")];
  if (made !== null) {
    if (waited !== null) parts.push(`waited ${seconds(Math.max(0, waited))}`);
    parts.push(`made in ${seconds(Math.max(0, made))}`);
  } else if (total !== null) {
    return `${parts[0]} in ${seconds(Math.max(0, total))}`;
  }
  return parts.join(" · ");
}

const button = (text, onclick, attrs = {}) =>
  el("button", { type: "button", class: "quiet", onclick, ...attrs }, text);

export class RunCard {
  /** on: {cancel, open, seed, input, retry, rerun, vary, restore, copy, delete, removed, grew}. */
  constructor(settings, on) {
    this.settings = settings;
    this.on = on;
    this.times = { accepted: null, started: null, done: null };
    this.meta = el("p", { class: "run-meta" });
    this.bar = el("progress", { class: "run-bar", "aria-label": "Progress" });
    this.status = el("span", { class: "run-status" }, "Sending…");
    this.cancelButton = el("button", { type: "button", class: "quiet run-cancel",
                                       onclick: () => on.cancel() }, "Cancel");
    this.removeButton = el("button", {
      type: "button", class: "quiet run-remove", hidden: true, title: "Remove from this page",
      "aria-label": "Remove from this page (it stays in History)", onclick: () => this.remove(),
    }, "×");
    this.grid = el("div", { class: "run-images" });
    this.actions = el("div", { class: "run-actions", hidden: true });
    this.node = el("article", { class: "run", "data-state": "sending", tabindex: "-1",
                                "aria-label": `Run: ${settings.prompt}` },
      el("header", { class: "run-head" }, this.inputThumb(settings.edit),
        el("div", { class: "run-text" },
          el("p", { class: "run-prompt", title: settings.prompt }, settings.prompt), this.meta),
        this.cancelButton, this.removeButton),
      el("div", { class: "run-progress" }, this.bar, this.status),
      this.grid, this.actions);
    const { width, height } = settings.edit || settings;  // an edit: about the input's size
    this.describe({ ...settings, width, height }, null);
    this.slots = this.placeholders(settings.n, width, height);
  }

  /** An edit's input, small and marked, before its prompt. */
  inputThumb(edit) {
    if (!edit?.url) return null;
    return el("span", { class: "run-input", title: "Input image" },
      el("img", { src: edit.url, alt: "Input image", decoding: "async" }));
  }

  get state() {
    return this.node.dataset.state;
  }

  describe({ model, width, height, steps }, seeds) {
    const edit = this.settings.edit;
    const strength = typeof edit?.strength === "number" ? `strength ${edit.strength}` : null;
    const loras = lorasText(appliedLoras(this.settings.loras, this.settings.prompt));
    this.meta.textContent = [editKind(edit), model, sizeText(width, height), plural(steps, "step"),
                             strength, loras ? `LoRA ${loras}` : null,
                             seedText(seeds, this.settings.seed)]
      .filter(Boolean).join(" · ");
  }

  placeholders(count, width, height) {
    const slots = Array.from({ length: count }, () => {
      const slot = el("div", { class: "slot" });
      slot.style.aspectRatio = `${width} / ${height}`;
      return slot;
    });
    this.grid.replaceChildren(...slots);
    return slots;
  }

  setState(state, text) {
    if (state !== "queued") this.stopCountdown();
    this.node.dataset.state = state;
    this.status.textContent = text;
  }

  accepted(job) {
    this.job = job;
    this.node.dataset.id = job.id;
    this.times.accepted = performance.now();
    this.describe(job, job.seeds);
    if (job.n !== this.slots.length) this.slots = this.placeholders(job.n, job.width, job.height);
    this.queued(job.position ?? null, job.eta_seconds);
  }

  queued(position, eta = null) {
    if (this.state === "cancelling") return;
    this.bar.removeAttribute("value");  // indeterminate while waiting
    this.setState("queued", queuedText(position, eta));
    this.node.dataset.position = position ?? "";
    this.countDown(position, eta);
  }

  /**
   * The server works out a wait when the job's place changes, and may say nothing more for a
   * while (the line ahead moves, its place does not): count down from its last estimate, never
   * past "starting any moment", until it says something new.
   */
  countDown(position, eta) {
    this.stopCountdown();
    if (typeof eta !== "number" || !Number.isFinite(eta) || eta < 1) return;
    const until = Date.now() + eta * 1000;
    this.countdown = setInterval(() => {
      if (!this.node.isConnected) return this.stopCountdown();
      const left = Math.max(0, (until - Date.now()) / 1000);
      this.status.textContent = queuedText(position, left);
      if (left < 1) this.stopCountdown();
    }, 1000);
  }

  stopCountdown() {
    clearInterval(this.countdown);
    this.countdown = null;
  }

  progress(step, steps) {
    const first = this.times.started === null;
    this.times.started ??= performance.now();
    this.bar.max = steps;
    this.bar.value = step;
    if (this.state !== "cancelling") this.setState("running", `Step ${step} of ${steps}`);
    if (first) this.on.grew?.();  // its image slots show from now on
  }

  preview(index, url) {
    const slot = this.slots[index];
    if (!slot) return;
    const image = slot.querySelector("img") || slot.appendChild(el("img", { alt: "", class: "preview" }));
    const old = image.src;
    image.src = url;
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  }

  cancelling() {
    this.cancelButton.disabled = true;
    this.setState("cancelling", "Cancelling…");
  }

  remove({ focus = true } = {}) {
    for (const image of this.grid.querySelectorAll("img")) {
      if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
    }
    const next = this.node.nextElementSibling;
    this.node.remove();
    if (!document.querySelector("#runs .run")) document.getElementById("runs-empty").hidden = false;
    if (focus) (next?.querySelector("button") || document.getElementById("prompt")).focus();
    this.on.removed?.();
  }

  finish(state, text, buttons) {
    this.times.done = performance.now();
    const hadFocus = document.activeElement === this.cancelButton;
    this.cancelButton.hidden = true;
    this.removeButton.hidden = false;
    this.setState(state, text);
    for (const old of this.grid.querySelectorAll("img.preview")) URL.revokeObjectURL(old.src);
    this.showActions(buttons);
    // The hidden Cancel button drops its focus to the page; keep it on this run.
    if (hadFocus) (this.node.querySelector(".run-actions button") || this.removeButton).focus();
  }

  /** The buttons under a finished run; Delete only for a job the server holds. */
  showActions(buttons) {
    const on = this.on;
    const all = {
      retry: button("Retry", () => on.retry(), { class: "primary run-retry" }),
      again: button("Run again", () => on.retry(), { class: "primary run-again",
                                                     title: "Send it again, as a new job" }),
      rerun: button("Re-run", () => on.rerun(), { class: "quiet run-rerun",
                                                  title: "Again, with the same settings and seed" }),
      vary: button("Vary", () => on.vary(), { class: "quiet run-vary",
                                              title: "Again, with a new random seed" }),
      restore: button("Restore settings", () => on.restore(), {
        class: "quiet run-restore", title: "Put these settings into the form" }),
      copy: button("Copy settings", () => on.copy(), {
        class: "quiet run-copy", title: "Copy the settings as JSON (the body of POST /v1/jobs)" }),
      delete: this.job ? button("Delete", () => this.confirmDelete(), {
        class: "quiet danger run-delete", title: "Delete this run and its images from the server" })
        : null,
    };
    this.actions.replaceChildren(...buttons.map((name) => all[name]).filter(Boolean));
    this.actions.hidden = false;
  }

  /** Ask in place before deleting: the images go from the server for good. */
  confirmDelete() {
    confirmDelete(this.actions, { kind: "run", remove: () => this.on.delete(),
                                  question: "Delete this run and its images from the server?" });
  }

  completed(images, result, times) {
    this.bar.max = 1;
    this.bar.value = 1;
    this.describe({ ...this.settings, ...result }, images.map((i) => i.seed));
    this.finish("completed", doneText(images.length, times),
                ["rerun", "vary", "restore", "copy", "delete"]);
    this.grid.replaceChildren(...images.map((item, index) => resultFigure(item, {
      onOpen: () => this.on.open(images, index),
      onSeed: () => this.on.seed(item.seed),
      onInput: () => this.on.input(item),
    })));
    for (const warning of result.warnings || []) {
      this.grid.before(el("p", { class: "run-warning" }, warning));
    }
    this.on.grew?.();
  }

  /**
   * reason: "unreachable" when the cluster could not be reached; "gone" when the server no
   * longer has the job (then it can only be run again, and there is nothing to delete).
   */
  failed(message, { reason = null } = {}) {
    this.node.dataset.reason = reason || "";
    if (reason === "gone") this.job = null;
    this.finish("failed", message, reason === "gone" ? ["again", "restore", "copy"]
                                                     : ["retry", "restore", "copy", "delete"]);
    this.grid.replaceChildren();
  }

  /** Follow the same job again after contact was lost: waiting once more, its slots empty. */
  resumed() {
    const hadFocus = this.node.contains(document.activeElement);
    this.times.done = null;
    this.node.dataset.reason = "";
    this.actions.hidden = true;
    this.actions.replaceChildren();
    this.removeButton.hidden = true;
    this.cancelButton.hidden = false;
    this.cancelButton.disabled = false;
    this.bar.removeAttribute("value");
    this.slots = this.placeholders(this.job.n, this.job.width, this.job.height);
    this.setState("sending", "Reconnecting…");
    // Retry, which had the focus, is gone: keep it on this run.
    if (hadFocus) this.cancelButton.focus({ preventScroll: true });
  }

  cancelled(text) {
    this.finish("cancelled", text, ["rerun", "restore", "copy", "delete"]);
    this.grid.replaceChildren();
  }
}
