// Generated images: base64 to Blob, file names, and the figure shown for each.
import { el } from "./dom.js";
import { sizeText } from "./words.js";

export async function blobOf(b64, format) {
  const response = await fetch(`data:image/${format};base64,${b64}`);
  return response.blob();
}

export function filename(prompt, seed, format) {
  const slug = prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "")
    .slice(0, 48).replace(/-+$/, "");
  return `${slug || "image"}-${seed}.${format === "jpeg" ? "jpg" : format}`;
}

/**
 * One result: the image (a button that opens the full-size view), its seed (a button that
 * reuses it) and a download link. item: {url, seed, width, height, filename, prompt}.
 */
export function resultFigure(item, { onOpen, onSeed, onInput }) {
  const image = el("img", {
    src: item.url, alt: `${item.prompt}, seed ${item.seed}`, width: item.width,
    height: item.height, decoding: "async",
  });
  return el("figure", { class: "result" },
    el("button", { type: "button", class: "thumb", onclick: onOpen,
                   "aria-label": `Open full size: seed ${item.seed}` }, image),
    el("figcaption", {},
      el("button", { type: "button", class: "seed", onclick: onSeed,
                     title: "Reuse this seed", "aria-label": `Reuse seed ${item.seed}` },
         `Seed ${item.seed}`),
      el("span", { class: "dims" }, sizeText(item.width, item.height)),
      onInput ? el("button", { type: "button", class: "quiet use-input", onclick: onInput,
                               title: "Edit this image: make it the input image" },
                   "Use as input") : null,
      el("a", { href: item.url, download: item.filename, class: "download" }, "Download")));
}
