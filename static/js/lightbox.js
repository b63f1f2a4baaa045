// The full-size view: a modal <dialog>, so Esc closes it and focus returns where it was.
// A click or tap on the image (or the zoom button, or Z) shows it at actual pixels (1:1), or at
// twice its fitted size when it is fitted larger than that; dragging pans it then. Unzoomed, a sideways
// swipe (or the arrow keys) moves to the next or previous image. Two fingers pinch to zoom, about
// the point between them, from the fitted size to MAX_ZOOM times the actual pixels.
import { $ } from "./dom.js";
import { useAsInput } from "./editor.js";
import { useSeed } from "./form.js";
import { sizeText } from "./words.js";

const SWIPE_PX = 50;  // a sideways drag at least this long, and mostly sideways, is a swipe
const TAP_PX = 6;  // a press that moves less than this is a click or a tap
const MAX_ZOOM = 4;  // the most a pinch shows, in actual pixels (more for a small image)

let items = [];  // [{url, seed, width, height, filename, prompt}]
let index = 0;
let zoom = null;  // the scale shown, natural pixels = 1; null when the image fits the view
let fitted = 1;  // the scale of the fitted image, measured as the zoom began
let press = null;  // the pointer press being followed: where it began, and the scroll then
const pointers = new Map();  // pointer id → {x, y}: those down on the view now
let pinch = null;  // two pointers down: their distance, the scales and the image point then

const image = () => $("lightbox-image");
const view = () => $("lightbox-view");

/** The zoom a click gives: 1:1, or twice the fitted size when the fitted image is already
 * larger than its actual pixels (a small image on a large screen). */
function zoomTarget() {
  const fitted = image().getBoundingClientRect().width / (image().naturalWidth || 1);
  return fitted < 1 ? 1 : 2 * fitted;
}

function zoomLabel() {
  if (zoom) return "Fit";
  const target = zoomTarget();
  return target === 1 ? "1:1" : `${Math.round(target * 100)}%`;
}

function caption() {
  const item = items[index];
  const at = zoom ? ` · ${Math.round(zoom * 100)}%` : "";
  $("lightbox-caption").textContent =
    `Seed ${item.seed} · ${sizeText(item.width, item.height)}` +
    (items.length > 1 ? ` · ${index + 1} of ${items.length}` : "") + at;
  $("lightbox-zoom").textContent = zoomLabel();
  $("lightbox-zoom").setAttribute("aria-pressed", String(Boolean(zoom)));
  $("lightbox-zoom").setAttribute("aria-label", zoom ? "Fit to the screen" : "Zoom to actual pixels");
}

function show() {
  const item = items[index];
  fit();
  image().src = item.url;
  image().alt = `${item.prompt || "generated image"}, seed ${item.seed}`;
  $("lightbox-download").href = item.url;
  $("lightbox-download").download = item.filename;
  $("lightbox-prev").hidden = $("lightbox-next").hidden = items.length < 2;
  caption();
}

function step(delta) {
  index = (index + delta + items.length) % items.length;
  show();
}

/** The point of the image under (x, y), as fractions of its width and height. */
function imagePoint(x, y) {
  const box = image().getBoundingClientRect();
  return { fx: (x - box.left) / box.width, fy: (y - box.top) / box.height };
}

/** Show the image at `scale`, its point (fx, fy) under (x, y) on the screen. */
function zoomTo(scale, { fx, fy }, x, y) {
  const img = image();
  const within = view().getBoundingClientRect();
  if (!zoom) {
    // The view keeps the size the fitted image gave it; the image grows inside it.
    fitted = img.getBoundingClientRect().width / img.naturalWidth;
    view().style.width = `${within.width}px`;
    view().style.height = `${within.height}px`;
    view().classList.add("zoomed");
  }
  zoom = scale;
  img.style.width = `${img.naturalWidth * zoom}px`;
  img.style.height = `${img.naturalHeight * zoom}px`;
  view().scrollLeft = fx * img.naturalWidth * zoom - (x - within.left);
  view().scrollTop = fy * img.naturalHeight * zoom - (y - within.top);
  caption();
}

/** Zoom in, keeping the point under (x, y) (the view's centre when not given) where it is. */
function zoomIn(x, y) {
  const box = image().getBoundingClientRect();
  if (!image().naturalWidth || !box.width) return;
  const px = x ?? box.left + box.width / 2;
  const py = y ?? box.top + box.height / 2;
  zoomTo(zoomTarget(), imagePoint(px, py), px, py);
}

function fit() {
  zoom = null;
  view().classList.remove("zoomed");
  for (const node of [view(), image()]) node.style.removeProperty("width");
  for (const node of [view(), image()]) node.style.removeProperty("height");
  if (items.length) caption();
}

function toggleZoom(x, y) {
  if (zoom) fit();
  else zoomIn(x, y);
}

/** Follow a press from (x, y); panOnly: the finger left from a pinch (no tap, no swipe). */
function startPress(id, { x, y }, panOnly = false) {
  press = { id, x, y, left: view().scrollLeft, top: view().scrollTop, moved: panOnly, panOnly };
}

const midpoint = ([a, b]) => ({ x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 });
const distance = ([a, b]) => Math.hypot(a.x - b.x, a.y - b.y);

function startPinch() {
  if (!image().naturalWidth) return;
  const points = [...pointers.values()];
  const { x, y } = midpoint(points);
  press = null;  // two fingers neither tap nor swipe
  view().classList.remove("panning");
  const least = zoom ? fitted : image().getBoundingClientRect().width / image().naturalWidth;
  pinch = { distance: Math.max(1, distance(points)), scale: zoom ?? least, least,
            at: imagePoint(x, y) };
}

/** Scale by how far apart the fingers moved, the image point between them staying there. */
function movePinch() {
  const points = [...pointers.values()];
  const { least } = pinch;
  const most = Math.max(MAX_ZOOM, 2 * least);
  const scale = Math.min(most, Math.max(least, pinch.scale * distance(points) / pinch.distance));
  const { x, y } = midpoint(points);
  if (scale <= least * 1.001) fit();
  else zoomTo(scale, pinch.at, x, y);
}

function pointerDown(event) {
  if (event.button !== 0) return;
  pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
  view().setPointerCapture(event.pointerId);
  event.preventDefault();
  if (pointers.size === 2) startPinch();
  else if (pointers.size === 1) startPress(event.pointerId, pointers.get(event.pointerId));
}

function pointerMove(event) {
  if (!pointers.has(event.pointerId)) return;
  pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
  if (pinch && pointers.size === 2) {
    movePinch();
    return;
  }
  if (!press || event.pointerId !== press.id) return;
  const dx = event.clientX - press.x;
  const dy = event.clientY - press.y;
  if (Math.hypot(dx, dy) >= TAP_PX) press.moved = true;
  if (zoom) {
    view().scrollLeft = press.left - dx;
    view().scrollTop = press.top - dy;
    view().classList.toggle("panning", press.moved);
  }
}

/** A finger lifted from a pinch: the one left pans on, never taps or swipes. */
function endPinch() {
  pinch = null;
  const [rest] = pointers.entries();
  if (rest) startPress(rest[0], rest[1], true);
}

function pointerUp(event) {
  pointers.delete(event.pointerId);
  if (pinch) {
    endPinch();
    return;
  }
  if (!press || event.pointerId !== press.id) return;
  const dx = event.clientX - press.x;
  const dy = event.clientY - press.y;
  const { moved, panOnly } = press;
  press = null;
  view().classList.remove("panning");
  if (!moved) toggleZoom(event.clientX, event.clientY);
  else if (!zoom && !panOnly && items.length > 1 && Math.abs(dx) >= SWIPE_PX && Math.abs(dx) > 1.5 * Math.abs(dy)) {
    step(dx < 0 ? 1 : -1);  // swiping left brings the next image, as on a phone's gallery
  }
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
  $("lightbox-zoom").addEventListener("click", () => toggleZoom());
  $("lightbox-seed").addEventListener("click", () => {
    dialog.close();
    useSeed(items[index].seed);
  });
  $("lightbox-input").addEventListener("click", () => {
    dialog.close();
    useAsInput(items[index].url);
  });
  dialog.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey) return;
    if (event.key === "ArrowLeft" && items.length > 1) step(-1);
    if (event.key === "ArrowRight" && items.length > 1) step(1);
    if (event.key === "z" || event.key === "Z") toggleZoom();
  });
  dialog.addEventListener("close", fit);
  // The label of the zoom button depends on the image's size, known once it has loaded.
  image().addEventListener("load", () => { if (items.length) caption(); });
  view().addEventListener("pointerdown", pointerDown);
  view().addEventListener("pointermove", pointerMove);
  view().addEventListener("pointerup", pointerUp);
  view().addEventListener("pointercancel", (event) => {
    pointers.delete(event.pointerId);
    pinch = null;
    press = null;
    view().classList.remove("panning");
  });
  // A pointer whose up never came here (the dialog closed under it) is not down any more.
  view().addEventListener("lostpointercapture", (event) => pointers.delete(event.pointerId));
  // A click on the backdrop (the dialog itself, outside its body) closes it.
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close();
  });
}
