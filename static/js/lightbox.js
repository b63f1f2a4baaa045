// The full-size view: a modal <dialog>, so Esc closes it and focus returns where it was.
import { $ } from "./dom.js";
import { useSeed } from "./form.js";
import { sizeText } from "./words.js";

let items = [];  // [{url, seed, width, height, filename, prompt}]
let index = 0;

function show() {
  const item = items[index];
  const image = $("lightbox-image");
  image.src = item.url;
  image.alt = `${item.prompt || "generated image"}, seed ${item.seed}`;
  $("lightbox-caption").textContent =
    `Seed ${item.seed} · ${sizeText(item.width, item.height)}` +
    (items.length > 1 ? ` · ${index + 1} of ${items.length}` : "");
  $("lightbox-download").href = item.url;
  $("lightbox-download").download = item.filename;
  $("lightbox-prev").hidden = $("lightbox-next").hidden = items.length < 2;
}

function step(delta) {
  index = (index + delta + items.length) % items.length;
  show();
}

/** Open images[start] full size; arrow keys move through the others. */
export function openLightbox(images, start = 0) {
  items = images;
  index = start;
  show();
  $("lightbox").showModal();
  $("lightbox-close").focus();
}

export function initLightbox() {
  const dialog = $("lightbox");
  $("lightbox-close").addEventListener("click", () => dialog.close());
  $("lightbox-prev").addEventListener("click", () => step(-1));
  $("lightbox-next").addEventListener("click", () => step(1));
  $("lightbox-seed").addEventListener("click", () => {
    dialog.close();
    useSeed(items[index].seed);
  });
  dialog.addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft" && items.length > 1) step(-1);
    if (event.key === "ArrowRight" && items.length > 1) step(1);
  });
  // A click on the backdrop (the dialog itself, outside its body) closes it.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
}
