// One generation on screen: its settings, progress, previews, and then its images or error.
import { el } from "./dom.js";
import { resultFigure } from "./images.js";
import { plural, seconds, sizeText } from "./words.js";

function seedText(seeds, requested) {
  if (seeds && seeds.length > 1) return `seeds ${seeds[0]}–${seeds[seeds.length - 1]}`;
  if (seeds && seeds.length) return `seed ${seeds[0]}`;
  return requested === null ? "random seed" : `seed ${requested}`;
}

export class RunCard {
  constructor(settings, { onCancel, onOpen, onSeed }) {
    this.settings = settings;
    this.onOpen = onOpen;
    this.onSeed = onSeed;
    this.started = performance.now();
    this.meta = el("p", { class: "run-meta" });
    this.bar = el("progress", { class: "run-bar", "aria-label": "Progress" });
    this.status = el("span", { class: "run-status" }, "Sending…");
    this.cancelButton = el("button", { type: "button", class: "quiet run-cancel", onclick: onCancel },
                           "Cancel");
    this.removeButton = el("button", {
      type: "button", class: "quiet run-remove", hidden: true, title: "Remove from this page",
      "aria-label": "Remove from this page", onclick: () => this.remove(),
    }, "×");
    this.grid = el("div", { class: "run-images" });
    this.node = el("article", { class: "run", "data-state": "sending" },
      el("header", { class: "run-head" },
        el("div", { class: "run-text" },
          el("p", { class: "run-prompt", title: settings.prompt }, settings.prompt), this.meta),
        this.cancelButton, this.removeButton),
      el("div", { class: "run-progress" }, this.bar, this.status),
      this.grid);
    this.describe(settings, null);
    this.slots = this.placeholders(settings.n, settings.width, settings.height);
  }

  describe({ model, width, height, steps }, seeds) {
    this.meta.textContent = [model, sizeText(width, height), plural(steps, "step"),
                             seedText(seeds, this.settings.seed)].join(" · ");
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
    this.node.dataset.state = state;
    this.status.textContent = text;
  }

  accepted(job) {
    this.job = job;
    this.describe(job, job.seeds);
    if (job.n !== this.slots.length) this.slots = this.placeholders(job.n, job.width, job.height);
    this.queued(job.position ?? null);
  }

  queued(position) {
    if (this.node.dataset.state === "cancelling") return;
    this.bar.removeAttribute("value");  // indeterminate while waiting
    const where = position === null ? "" : position === 0 ? " — next in line"
                : ` — ${plural(position, "job")} ahead`;
    this.setState("queued", `Queued${where}`);
  }

  progress(step, steps) {
    this.bar.max = steps;
    this.bar.value = step;
    if (this.node.dataset.state !== "cancelling") {
      this.setState("running", `Step ${step} of ${steps}`);
    }
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

  remove() {
    for (const image of this.grid.querySelectorAll("img")) URL.revokeObjectURL(image.src);
    const next = this.node.nextElementSibling;
    this.node.remove();
    if (!document.querySelector("#runs .run")) document.getElementById("runs-empty").hidden = false;
    (next?.querySelector("button") || document.getElementById("prompt")).focus();
  }

  finish(state, text) {
    this.cancelButton.hidden = true;
    this.removeButton.hidden = false;
    this.setState(state, text);
    for (const old of this.grid.querySelectorAll("img.preview")) URL.revokeObjectURL(old.src);
  }

  completed(images, result) {
    this.bar.max = 1;
    this.bar.value = 1;
    this.describe({ ...this.settings, ...result }, images.map((i) => i.seed));
    const elapsed = seconds(performance.now() - this.started);
    this.finish("completed", `${plural(images.length, "image")} in ${elapsed}`);
    this.grid.replaceChildren(...images.map((item, index) => resultFigure(item, {
      onOpen: () => this.onOpen(images, index),
      onSeed: () => this.onSeed(item.seed),
    })));
    for (const warning of result.warnings || []) {
      this.grid.before(el("p", { class: "run-warning" }, warning));
    }
  }

  failed(message) {
    this.finish("failed", message);
    this.grid.replaceChildren();
  }

  cancelled(text) {
    this.finish("cancelled", text);
    this.grid.replaceChildren();
  }
}
