// The input image of an edit and the mask painted over it. An image comes by the file button,
// a drop on the form, a paste, or "Use as input" on a result; with one set, Generate edits it.
// The mask is painted at the image's own pixels (pointer positions are scaled to them) and sent
// as a PNG whose painted pixels are fully transparent (OpenAI's rule: alpha 0 = edit there).
// Nothing painted: the whole image is re-made (img2img) and no mask is sent.
import { $, toast } from "./dom.js";
import { fetchBlob, fileUrl } from "./edits.js";
import { sizeText } from "./words.js";

const SENT_AS_IS = ["image/png", "image/jpeg", "image/webp"];  // what the server reads
const STRENGTH = { edit: 0.75, inpaint: 1 };  // the server's defaults: keep it, or make anew
const PAINT = "rgb(255 45 120)";  // shown at the canvas's opacity over the image

let input = null;  // {image: Blob, url, width, height}
let painted = false;  // whether the mask marks any pixel
let strengthMoved = false;  // the person chose a strength: painting no longer changes it
let stroke = null;  // the pointer painting now: {id, x, y} in image pixels
let onChange = () => {};

const canvas = () => $("mask-canvas");
const erasing = () => $("tool-eraser").checked;

/** "edit" or "inpaint" while an input is set, else null (Generate makes a new image). */
export const editMode = () => (input ? (painted ? "inpaint" : "edit") : null);

/** Decode an image from a URL, or fail when the browser cannot read it. */
async function decoded(url) {
  const image = new Image();
  image.src = url;
  await image.decode();
  return image;
}

/** A PNG of what an image shows, for formats the server does not read (GIF, BMP, AVIF…). */
function pngOf(image) {
  const drawn = Object.assign(document.createElement("canvas"),
                              { width: image.naturalWidth, height: image.naturalHeight });
  drawn.getContext("2d").drawImage(image, 0, 0);
  return new Promise((resolve) => drawn.toBlob(resolve, "image/png"));
}

/**
 * Make `blob` the input, its mask empty or read from `mask` (a PNG as sent or as the server
 * stored it); `strength` as it was for a restored edit. False when it is not an image.
 */
export async function setInput(blob, { mask = null, strength = null, quiet = false } = {}) {
  const url = URL.createObjectURL(blob);
  let image;
  try {
    image = await decoded(url);
  } catch {
    URL.revokeObjectURL(url);
    toast("That file is not an image this browser can read (PNG, JPEG or WebP).");
    return false;
  }
  const sent = SENT_AS_IS.includes(blob.type) ? blob : await pngOf(image);
  input = { image: sent, url, width: image.naturalWidth, height: image.naturalHeight };
  $("editor-image").src = url;
  const stage = $("editor-stage");
  stage.style.aspectRatio = `${input.width} / ${input.height}`;
  stage.style.setProperty("--ratio", input.width / input.height);
  Object.assign(canvas(), { width: input.width, height: input.height });
  sizeBrush();
  painted = false;
  if (mask) await readMask(mask);
  if (strength !== null) setStrength(strength, { moved: true });
  else if (!strengthMoved) setStrength(STRENGTH[editMode()]);
  showEditor(true);
  changed();
  if (!quiet) toast(`Input image set: ${sizeText(input.width, input.height)}`);
  return true;
}

/** Back to generating from the prompt alone. */
export function removeInput() {
  if (!input) return;
  input = null;
  painted = false;
  strengthMoved = false;
  setStrength(STRENGTH.edit);
  $("editor-image").removeAttribute("src");
  Object.assign(canvas(), { width: 1, height: 1 });
  showEditor(false);
  changed();
}

function showEditor(shown) {
  $("input-field").hidden = !shown;
  $("input-choose").textContent = shown ? "Another image…" : "Edit an image…";
  $("size-field").hidden = shown;  // an edit keeps the input's size
}

/** Use a result (a stored image, or one of this page's blob: URLs) as the input. */
export async function useAsInput(url) {
  try {
    if (await setInput(await fetchBlob(url))) $("input-field").scrollIntoView({ block: "nearest" });
  } catch (err) {
    toast(`Could not use the image: ${err.message}`);
  }
}

/**
 * Put an edit's input and mask back (from a run of this page, or by their store names from
 * the history); null removes the input.
 */
export async function restoreInput(edit) {
  if (!edit) {
    removeInput();
    return true;
  }
  try {
    const image = edit.image || await fetchBlob(fileUrl(edit.imageName));
    const mask = edit.mask || (edit.maskName ? await fetchBlob(fileUrl(edit.maskName)) : null);
    return await setInput(image, { mask, strength: edit.strength, quiet: true });
  } catch (err) {
    toast(`The input image could not be restored: ${err.message}`);
    return false;
  }
}

/**
 * Paint where a mask marks: transparent pixels (alpha 0) when it has any, else white ones (the
 * server reads a mask the same way).
 */
async function readMask(blob) {
  const image = await decoded(URL.createObjectURL(blob));
  URL.revokeObjectURL(image.src);
  const { width, height } = canvas();
  const context = canvas().getContext("2d");
  context.clearRect(0, 0, width, height);
  context.drawImage(image, 0, 0, width, height);
  const pixels = context.getImageData(0, 0, width, height);
  const data = pixels.data;
  let transparent = false;
  for (let i = 3; i < data.length && !transparent; i += 4) transparent = data[i] < 255;
  painted = false;
  for (let i = 0; i < data.length; i += 4) {
    const light = 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
    const edit = transparent ? data[i + 3] === 0 : light >= 128;
    painted ||= edit;
    [data[i], data[i + 1], data[i + 2], data[i + 3]] = edit ? [255, 45, 120, 255] : [0, 0, 0, 0];
  }
  context.putImageData(pixels, 0, 0);
}

/** The brush's range and size in the image's pixels: up to a quarter of its longer side. */
function sizeBrush() {
  const longer = Math.max(input.width, input.height);
  const range = $("brush-size");
  range.max = Math.max(8, Math.round(longer / 4));
  range.value = Math.max(2, Math.round(longer / 16));
}

function setStrength(value, { moved = false } = {}) {
  $("strength").value = value;
  $("strength-value").textContent = Number(value).toFixed(2);
  if (moved) strengthMoved = true;
}

function changed() {
  $("mask-clear").disabled = !painted;
  if (input) {
    const kind = editMode() === "inpaint"
      ? "Inpainting: only the painted area changes."
      : "Paint where it may change; with nothing painted the whole image is re-made.";
    $("editor-note").textContent = `${kind} Output ${sizeText(input.width, input.height)}, ` +
      "the input's size (fitted to the model's limits).";
  }
  onChange();
}

/** The point of the image under a pointer, in its own pixels. */
function imagePoint(event) {
  const box = canvas().getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas().width / box.width,
           y: (event.clientY - box.top) * canvas().height / box.height };
}

function brushWidth() {
  return Number($("brush-size").value);
}

function paint(from, to) {
  const context = canvas().getContext("2d");
  context.globalCompositeOperation = erasing() ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = PAINT;
  context.lineWidth = brushWidth();
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  if (from.x === to.x && from.y === to.y) {
    context.arc(to.x, to.y, brushWidth() / 2, 0, 2 * Math.PI);  // a dot: a line of no length draws nothing
    context.fill();
  } else {
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }
}

function pointerDown(event) {
  if (stroke || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  canvas().setPointerCapture(event.pointerId);
  const at = imagePoint(event);
  stroke = { id: event.pointerId, ...at };
  paint(at, at);
}

function pointerMove(event) {
  ring(event);
  if (!stroke || event.pointerId !== stroke.id) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of events.length ? events : [event]) {
    const at = imagePoint(each);
    paint(stroke, at);
    Object.assign(stroke, at);
  }
}

function pointerUp(event) {
  if (!stroke || event.pointerId !== stroke.id) return;
  stroke = null;
  const was = painted;
  painted = erasing() ? maskMarks() : true;
  if (!strengthMoved && was !== painted) setStrength(STRENGTH[editMode()]);
  changed();
}

/** The brush's outline under a mouse or pen, at the size it paints. */
function ring(event) {
  const shown = $("brush-ring");
  if (event.pointerType === "touch" || event.type === "pointerleave") {
    shown.hidden = true;
    return;
  }
  const box = canvas().getBoundingClientRect();
  const stage = $("editor-stage").getBoundingClientRect();
  const size = brushWidth() * box.width / canvas().width;
  shown.hidden = false;
  Object.assign(shown.style, { width: `${size}px`, height: `${size}px`,
                               left: `${event.clientX - stage.left}px`, top: `${event.clientY - stage.top}px` });
}

/** Whether any pixel is painted (at least half opaque: what the mask sent marks). */
function maskMarks() {
  const { width, height } = canvas();
  const data = canvas().getContext("2d").getImageData(0, 0, width, height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
  return false;
}

function clearMask() {
  const { width, height } = canvas();
  canvas().getContext("2d").clearRect(0, 0, width, height);
  painted = false;
  if (!strengthMoved) setStrength(STRENGTH.edit);
  changed();
}

/** The mask as sent: a PNG of the image's size, alpha 0 where painted and opaque elsewhere. */
function maskPng() {
  const { width, height } = canvas();
  const pixels = canvas().getContext("2d").getImageData(0, 0, width, height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const edit = data[i + 3] >= 128;
    data[i] = data[i + 1] = data[i + 2] = edit ? 0 : 255;
    data[i + 3] = edit ? 0 : 255;
  }
  const out = Object.assign(document.createElement("canvas"), { width, height });
  out.getContext("2d").putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

/** The edit Generate sends now (see edits.js), or null when no input is set. */
export async function currentEdit() {
  if (!input) return null;
  const mask = painted ? await maskPng() : null;
  return { image: input.image, mask, imageName: null, maskName: null, url: input.url,
           width: input.width, height: input.height, strength: Number($("strength").value) };
}

/** The first image among dropped or pasted items, or null. */
function imageIn(transfer) {
  return [...(transfer?.files || [])].find((file) => file.type.startsWith("image/")) || null;
}

function initDrop() {
  const form = $("generate");
  const carries = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  form.addEventListener("dragover", (event) => {
    if (!carries(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    form.classList.add("dropping");
  });
  form.addEventListener("dragleave", (event) => {
    if (!form.contains(event.relatedTarget)) form.classList.remove("dropping");
  });
  form.addEventListener("drop", (event) => {
    form.classList.remove("dropping");
    if (!carries(event)) return;
    event.preventDefault();
    const file = imageIn(event.dataTransfer);
    if (file) setInput(file);
    else toast("Drop an image file (PNG, JPEG or WebP)");
  });
}

/** A pasted image becomes the input; text pasted into a text field stays text. */
function onPaste(event) {
  const file = imageIn(event.clipboardData);
  if (!file) return;
  const target = event.target;
  const typing = target?.matches?.("textarea, input:not([type=file]), [contenteditable]");
  if (typing && event.clipboardData.types.includes("text/plain")) return;
  event.preventDefault();
  setInput(file);
}

export function initEditor({ changed: onChanged = () => {} } = {}) {
  onChange = onChanged;
  $("input-choose").addEventListener("click", () => $("input-file").click());
  $("input-file").addEventListener("change", () => {
    const file = $("input-file").files[0];
    if (file) setInput(file);
    $("input-file").value = "";  // the same file chosen again is a change too
  });
  $("input-remove").addEventListener("click", () => {
    removeInput();
    $("input-choose").focus();
  });
  $("mask-clear").addEventListener("click", clearMask);
  $("strength").addEventListener("input", () => setStrength($("strength").value, { moved: true }));
  const mask = canvas();
  mask.addEventListener("pointerdown", pointerDown);
  mask.addEventListener("pointermove", pointerMove);
  mask.addEventListener("pointerup", pointerUp);
  mask.addEventListener("pointercancel", pointerUp);
  mask.addEventListener("pointerleave", ring);
  initDrop();
  document.addEventListener("paste", onPaste);
}
