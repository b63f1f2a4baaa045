// What a model accepts, from the `limits` of GET /v1/models: size presets and validation.
// Pure functions, so the rules read in one place.
import { megapixels, sizeText } from "./words.js";

const RATIOS = [
  ["Square", 1, 1], ["Portrait", 3, 4], ["Landscape", 4, 3], ["Wide", 16, 9], ["Tall", 9, 16],
];
const NAMED_RATIOS = [[1, 1], [3, 4], [4, 3], [16, 9], [9, 16], [2, 3], [3, 2], [4, 5], [5, 4],
                      [21, 9], [9, 21], [7, 4], [4, 7]];
export const MAX_SEED = Number.MAX_SAFE_INTEGER;  // larger seeds lose digits in JavaScript numbers

export function parseSize(text) {
  const match = /^(\d+)x(\d+)$/.exec(text || "");
  return match ? { width: Number(match[1]), height: Number(match[2]) } : null;
}

const roundTo = (value, step) => Math.max(step, Math.round(value / step) * step);
const floorTo = (value, step) => Math.max(step, Math.floor(value / step) * step);
const ceilTo = (value, step) => Math.max(step, Math.ceil(value / step) * step);

/** The nearest named aspect ratio ("16:9"), or the exact one when none is close. */
export function ratioName(width, height) {
  const near = NAMED_RATIOS.find(([w, h]) => Math.abs(width / height / (w / h) - 1) < 0.03);
  if (near) return `${near[0]}:${near[1]}`;
  const gcd = (a, b) => (b ? gcd(b, a % b) : a);
  const d = gcd(width, height);
  return `${width / d}:${height / d}`;
}

/** Scale a size into the model's pixel bounds, staying on its size multiple. */
function withinPixels(width, height, limits, step) {
  const pixels = width * height;
  if (limits.max_pixels && pixels > limits.max_pixels) {
    const scale = Math.sqrt(limits.max_pixels / pixels);
    return { width: floorTo(width * scale, step), height: floorTo(height * scale, step) };
  }
  if (limits.min_pixels && pixels < limits.min_pixels) {
    const scale = Math.sqrt(limits.min_pixels / pixels);
    return { width: ceilTo(width * scale, step), height: ceilTo(height * scale, step) };
  }
  return { width, height };
}

/**
 * Sizes to offer: the model's fixed list when it has one, else the usual aspect ratios at the
 * area of its default size. Each is {label, ratio, width, height}.
 */
export function sizePresets(limits) {
  if (limits.allowed_sizes && limits.allowed_sizes.length) {
    return limits.allowed_sizes.map(parseSize).filter(Boolean).map(({ width, height }) => ({
      label: ratioName(width, height), ratio: ratioName(width, height), width, height,
    }));
  }
  const base = parseSize(limits.default_size) || { width: 1024, height: 1024 };
  const step = limits.size_multiple || 1;
  const area = base.width * base.height;
  const presets = [];
  const seen = new Set();
  const add = (label, ratio, size) => {
    const key = sizeText(size.width, size.height);
    if (!seen.has(key)) presets.push({ label, ratio, ...size });
    seen.add(key);
  };
  const isSquare = base.width === base.height;
  if (!isSquare) add("Default", ratioName(base.width, base.height), base);
  for (const [label, w, h] of RATIOS) {
    const size = withinPixels(roundTo(Math.sqrt(area * w / h), step),
                              roundTo(Math.sqrt(area * h / w), step), limits, step);
    add(label, `${w}:${h}`, size);
  }
  return presets;
}

/** The model's rule for sizes, in a few words: "multiples of 8 px, up to 1.0 MP". */
export function sizeRule(limits) {
  if (limits.allowed_sizes && limits.allowed_sizes.length) {
    return `only ${limits.allowed_sizes.map((s) => s.replace("x", "×")).join(", ")}`;
  }
  const most = limits.max_pixels ? `, up to ${(limits.max_pixels / 1e6).toFixed(1)} MP` : "";
  return `multiples of ${limits.size_multiple || 1} px${most}`;
}

/** Why the model cannot make this size, in words; null when it can. */
export function sizeProblem(width, height, limits) {
  const name = limits.name;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    return "Enter the width and height in whole pixels, like 1024 × 768.";
  }
  const allowed = limits.allowed_sizes || [];
  if (allowed.length) {
    if (allowed.includes(`${width}x${height}`)) return null;
    return `Choose one of the sizes ${name} makes: ${allowed.map((s) => s.replace("x", "×")).join(", ")}.`;
  }
  const step = limits.size_multiple || 1;
  if (width % step || height % step) {
    return `Width and height must be multiples of ${step} for ${name}; ` +
           `the nearest size is ${sizeText(roundTo(width, step), roundTo(height, step))}.`;
  }
  const pixels = width * height;
  if (limits.min_pixels && pixels < limits.min_pixels) {
    return `${sizeText(width, height)} is too small: ${name} needs at least ` +
           `${megapixels(limits.min_pixels)}.`;
  }
  if (limits.max_pixels && pixels > limits.max_pixels) {
    return `${sizeText(width, height)} is too large (${megapixels(pixels)}): ${name} makes ` +
           `at most ${megapixels(limits.max_pixels)}.`;
  }
  return null;
}

/** Problems with the settings, as {field: message}; empty when the request can be sent. */
export function settingsProblems(settings, limits) {
  const problems = {};
  const whole = (value, low, high) => Number.isInteger(value) && value >= low && value <= high;
  if (!settings.prompt.trim()) problems.prompt = "Write a prompt: what should the image show?";
  const size = sizeProblem(settings.width, settings.height, limits);
  if (size) problems.size = size;
  const maxSteps = limits.max_steps || 1000;
  if (!whole(settings.steps, 1, maxSteps)) {
    problems.steps = `Steps must be a whole number from 1 to ${maxSteps} for ${limits.name}.`;
  }
  if (limits.default_guidance !== null &&
      !(Number.isFinite(settings.guidance) && settings.guidance >= 0)) {
    problems.guidance = "Guidance is a number, 0 or more (higher follows the prompt more closely).";
  }
  if (!whole(settings.n, 1, 10)) problems.n = "Make 1 to 10 images at a time.";
  if (settings.seed !== null && !whole(settings.seed, 0, MAX_SEED)) {
    problems.seed = `A seed is a whole number from 0 to ${MAX_SEED}.`;
  }
  if (settings.output_format !== "png" && !whole(settings.output_compression, 0, 100)) {
    problems.output_compression = "Quality is a whole number from 0 to 100.";
  }
  return problems;
}
