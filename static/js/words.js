// Text for people: field names, counts, durations, errors.

/** The form's name for each request field, so a server error can point at what to change. */
export const FIELD_LABELS = {
  prompt: "Prompt", negative_prompt: "Negative prompt", model: "Model", size: "Size",
  width: "Size", height: "Size", steps: "Steps", guidance: "Guidance", n: "Images",
  seed: "Seed", output_format: "Format", output_compression: "Quality",
  partial_images: "Live previews", strength: "Strength", image: "Input image", mask: "Mask",
  loras: "Adapters",
};

export function plural(count, one, many = `${one}s`) {
  return `${count} ${count === 1 ? one : many}`;
}

export function sizeText(width, height) {
  return `${width}×${height}`;
}

export function seconds(ms) {
  return ms < 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

export function megapixels(pixels) {
  return pixels >= 1e6 ? `${(pixels / 1e6).toFixed(2)} megapixels`
                       : `${pixels.toLocaleString("en")} pixels`;
}

export function timeAgo(then, now = Date.now()) {
  const s = Math.round((now - then) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(then).toLocaleDateString();
}

/** "Size: tiny needs multiples of 8" — the message, led by the form field it is about. */
export function errorText(error) {
  const label = FIELD_LABELS[error.param];
  const text = label ? `${label}: ${error.message}` : error.message;
  return error.retryAfter ? `${text} (try again in ${plural(error.retryAfter, "second")})` : text;
}
