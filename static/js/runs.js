// A generation's life (or an edit's: POST /v1/jobs/edits): POST /v1/jobs, follow its events, cancel it, show its images, and what
// comes after (retry, re-run, vary, restore, copy settings, delete). A job from the history
// (another tab's or device's, say) can be followed the same way.
import { api, ApiError, errorOf, send } from "./api.js";
import { $, toast } from "./dom.js";
import { useAsInput } from "./editor.js";
import { editFields, submitEdit } from "./edits.js";
import { settingsOf } from "./entry.js";
import { currentLimits, requestBody, showProblem, useSeed } from "./form.js";
import { jobChanged, jobDeleted, jobSubmitted, restoreSettings, shownAbove } from "./history.js";
import { blobOf, filename } from "./images.js";
import { cancelJob, deleteJob, getJob } from "./jobs.js";
import { openLightbox } from "./lightbox.js";
import { queuedText, RunCard } from "./runcard.js";
import { showCode } from "./snippets.js";
import { readEvents } from "./sse.js";
import { withStream } from "./streams.js";
import { errorText, plural } from "./words.js";

const PREVIEWS = 3;  // partial_images asked for when live previews are on
const RECONNECTS = 4;
const FINISHED = { succeeded: "completed", failed: "failed", cancelled: "cancelled" };
const runs = new Map();  // job id → the run following it on this page
const active = [];  // runs not yet ended, oldest first (also those still being sent)

function announce(text) {
  $("status").textContent = text;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Scrolls this module starts, told apart from the person's own: a card is never pulled back
// into view after they scrolled elsewhere.
let ownScrollUntil = 0;  // performance.now() until which scroll events are ours
let userScrolledAt = -Infinity;
addEventListener("scroll", () => {
  if (performance.now() > ownScrollUntil) userScrolledAt = performance.now();
}, { passive: true });
addEventListener("scrollend", () => { ownScrollUntil = 0; });

/**
 * Scroll a card to the top of the screen unless it is there already: on a phone it starts
 * below the whole form, and its images grow beneath it.
 */
function bringIntoView(node) {
  const top = document.querySelector(".topbar")?.getBoundingClientRect().bottom ?? 0;
  const box = node.getBoundingClientRect();
  if (box.top >= top && box.top <= top + window.innerHeight * 0.25) return;
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  node.style.scrollMarginTop = `${Math.max(0, top) + 12}px`;  // clear the sticky top bar
  ownScrollUntil = performance.now() + 1500;  // until its scrollend; a bound if none comes
  node.scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
}

/**
 * Bring the newest card up again as its images appear, while it is on the screen and the
 * person has not scrolled since it started: a page too short to scroll it to the top when
 * it started (a phone's, say) is long enough now.
 */
function keepInView(run) {
  const node = run.card.node;
  if (node !== $("runs").querySelector(".run") || userScrolledAt > run.startedAt) return;
  const box = node.getBoundingClientRect();
  if (box.bottom > 0 && box.top < window.innerHeight) bringIntoView(node);
}

function newRun(settings, body, { watched = false } = {}) {
  // lost: contact went while the server had its job; interrupted: it was followed again since.
  const run = { settings, body, job: null, outcome: null, cancelAsked: false, watched,
                lost: false, interrupted: false, endedAt: null, startedAt: performance.now() };
  run.card = new RunCard(settings, {
    cancel: () => cancel(run),
    open: (images, index) => openLightbox(images, index),
    input: (item) => useAsInput(item.url),
    seed: (seed) => useSeed(seed),
    retry: () => retry(run),
    rerun: () => again(run, run.job?.seeds?.[0] ?? run.settings.seed),
    vary: () => again(run, null),
    restore: () => restoreSettings(madeWith(run)),
    copy: () => copySettings(run),
    delete: () => remove(run),
    removed: () => run.job && shownAbove(run.job.id, false),
    grew: () => keepInView(run),
  });
  $("runs-empty").hidden = true;
  $("runs").prepend(run.card.node);
  active.push(run);
  bringIntoView(run.card.node);
  return run;
}

/** Start a generation (an edit, when settings.edit is set) with these (checked) settings. */
export function startRun(settings, limits) {
  const body = { ...requestBody(settings, limits), partial_images: settings.previews ? PREVIEWS : 0 };
  if (settings.edit) {
    delete body.size;  // the input's own size, fitted to the model by the server
    body.strength = settings.edit.strength;
  }
  return launch(settings, body);
}

/** Send the job: an edit with its input (and mask) as multipart, else JSON. */
function submit(settings, body) {
  if (settings.edit) return submitEdit(settings.edit, body);
  return api("/v1/jobs", { method: "POST", body });
}

async function launch(settings, body) {
  const run = newRun(settings, body);
  announce(`Sending: ${plural(settings.n, "image")}. Its card is at the top of the results.`);
  try {
    run.job = await submit(settings, body);
    jobSubmitted(run.job);
    await followRun(run);
  } catch (err) {
    fail(run, err);
  } finally {
    settle(run);
  }
}

/** Follow a job this page did not start, from the history; one already followed is shown. */
export async function watchJob(job) {
  const open = runs.get(job.id);
  if (open) {
    bringIntoView(open.card.node);
    return;
  }
  const settings = { ...settingsOf(job), prompt: job.prompt ?? "" };
  const run = newRun(settings, bodyOf(job, settings), { watched: true });
  run.job = job;
  shownAbove(job.id, true);
  try {
    await followRun(run);
  } catch (err) {
    fail(run, err);
  } finally {
    settle(run);
  }
}

/** Cancel a job: through its run when this page follows it, so the run says who cancelled. */
export function cancelRun(job) {
  const run = runs.get(job.id);
  return run ? cancel(run) : cancelJob(job.id);
}

/**
 * Cancel the run whose card holds the focus, else the newest one still queued or running.
 * Returns whether one was asked to cancel.
 */
export function cancelLatestRun() {
  const card = document.activeElement?.closest?.("#runs .run");
  const cancellable = active.filter((run) => !run.cancelAsked && !run.outcome);
  // Focus on a run that is over (or being cancelled): Esc is about that one, not another.
  const run = card ? cancellable.find((each) => each.card.node === card)
                   : cancellable.at(-1);
  if (!run) return false;
  cancel(run);
  return true;
}

/** The body that makes this job again: as the client sent it, else from its settings. */
function bodyOf(job, settings) {
  if (job.request && typeof job.request === "object") {
    if (settings.edit) return editFields(job.request);  // the inputs go as files
    const { stream, ...body } = job.request;
    return body;
  }
  return requestBody(settings, currentLimits());
}

/** The settings a run was made with, its seed the one the server chose. */
function madeWith(run) {
  return { ...run.settings, seed: run.job?.seeds?.[0] ?? run.settings.seed };
}

function settle(run) {
  const index = active.indexOf(run);
  if (index >= 0) active.splice(index, 1);
}

async function followRun(run) {
  runs.set(run.job.id, run);
  try {
    run.card.accepted(run.job);
    if (run.job.status === "running") run.card.progress(run.job.step, run.job.steps);
    announce(run.watched ? `Following: ${plural(run.job.n, "image")}`
      : `${plural(run.job.n, "image")}: ${queuedText(run.job.position, run.job.eta_seconds)}`);
    if (run.cancelAsked) cancel(run);  // Cancel was pressed while the job was being sent
    await withStream(() => follow(run), () => pollStatus(run));
    run.endedAt ??= performance.now();
    await conclude(run);
  } finally {
    runs.delete(run.job.id);
    jobChanged(run.job.id);
  }
}

function fail(run, err) {
  const error = err instanceof ApiError ? err : { message: `something went wrong in this page: ${err.message}` };
  let text = errorText(error);
  let reason = null;
  if (error.status === 0) {
    reason = "unreachable";
    run.lost = Boolean(run.job);
    text = run.job
      ? "Lost contact with the cluster before the job finished; it may still be running there. " +
        "Retry follows the same job again once the cluster is back."
      : "The cluster cannot be reached, so nothing was sent. Retry once it is back.";
  }
  run.card.failed(text, { reason });
  if (error.param && !run.watched) showProblem(error.param, error.message);
  announce(`Failed: ${text}`);
}

/** The job's status while it waits for an event stream; true once it has ended. */
async function pollStatus(run) {
  try {
    const job = await api(`/v1/jobs/${run.job.id}`, { background: true });
    if (job.status === "queued") run.card.queued(job.position, job.eta_seconds);
    else if (job.status === "running") run.card.progress(job.step, job.steps);
    else if (FINISHED[job.status]) {
      run.outcome = { name: FINISHED[job.status], data: job.result || job };
    }
  } catch { /* the event stream, once open, says what happened */ }
  return Boolean(run.outcome);
}

/** Read the job's events until its outcome, reconnecting if the connection drops. */
async function follow(run) {
  let lastError = null;
  for (let attempt = 0; attempt <= RECONNECTS && !run.outcome; attempt += 1) {
    if (attempt) await sleep((lastError?.retryAfter || 2 ** attempt / 2) * 1000);
    try {
      const response = await send(`/v1/jobs/${run.job.id}/events`,
                                  { headers: { Accept: "text/event-stream" } });
      if (!response.ok) throw await errorOf(response);
      await readJobEvents(run, response.body);
    } catch (err) {
      // 429: too many open streams on the server; worth waiting. Other 4xx will not change.
      const final = err instanceof ApiError && err.status >= 400 && err.status < 500 &&
                    err.status !== 429;
      if (final) throw err;
      lastError = err;
    }
  }
  if (!run.outcome) {
    throw lastError instanceof ApiError ? lastError
      : new ApiError(0, { message: "the connection to the server was lost before the job finished" });
  }
}

function readJobEvents(run, body) {
  return readEvents(body, (name, data) => {
    if (name === "queued") run.card.queued(data.position, data.eta_seconds);
    else if (name === "progress") {
      run.steps = data.steps;
      run.card.progress(data.step, data.steps);
    }
    else if (name === "preview") showPreview(run, data);
    else if (["completed", "failed", "cancelled"].includes(name)) {
      run.outcome = { name, data };
      run.endedAt = performance.now();
    }
    return Boolean(run.outcome);
  });
}

async function showPreview(run, { image_index: index, step, b64_json: b64, output_format: format }) {
  // Previews carry no step count; the last progress event's is right even for two-stage models.
  // A preview is encoded apart and may come after later steps: it never moves the bar back.
  if (!(run.card.bar.value >= step)) run.card.progress(step, run.steps || run.job.steps);
  const blob = await blobOf(b64, format || "png");
  if (!run.outcome) run.card.preview(index, URL.createObjectURL(blob));
}

async function conclude(run) {
  const { name, data } = run.outcome;
  if (name === "cancelled") {
    // The server also cancels a job whose last watcher went away, as when a connection drops.
    run.card.cancelled(run.cancelAsked || run.watched ? "Cancelled"
      : "Cancelled elsewhere, or by the server when the connection to it was interrupted");
    announce("Cancelled");
  } else if (name === "failed") {
    fail(run, new ApiError(500, data.error || { message: "the job failed" }));
  } else {
    const images = await imagesOf(data, run.settings.prompt);
    const times = await timesOf(run, data);
    run.card.completed(images, data, times);
    announce(`Done: ${run.card.status.textContent}`);
  }
}

/**
 * How long the job waited and how long it took to make, in ms. Measured here: from accepted
 * to the first step is the wait, from there to the result the making. A job followed from the
 * history was not seen from its start: the server's times tell, where it gives them.
 */
async function timesOf(run, result) {
  const { accepted, started } = run.card.times;
  const ended = run.endedAt;
  const seenWhole = !run.watched && !run.interrupted;
  if (seenWhole && started !== null) return { waited: started - accepted, made: ended - started };
  // The worker's own time making it (the server reports no start time, so no wait either).
  const generated = result.timings?.generate_s;
  if (typeof generated === "number") {
    const made = generated * 1000;
    return { waited: seenWhole ? ended - accepted - made : null, made };
  }
  if (seenWhole) return { total: ended - accepted };
  try {
    const job = await getJob(run.job.id);
    if (job.finished) return { total: (job.finished - job.created) * 1000 };
  } catch { /* nothing better is known */ }
  return { total: null };
}

/** The images by the URLs the server keeps them at; from their bytes where it keeps none. */
async function imagesOf(response, prompt) {
  const format = response.output_format || "png";
  return Promise.all(response.data.map(async (item) => ({
    url: item.url || URL.createObjectURL(await blobOf(item.b64_json, format)),
    seed: item.seed, prompt, format, filename: filename(prompt, item.seed, format),
    width: item.width ?? response.width, height: item.height ?? response.height,
  })));
}

async function cancel(run) {
  run.cancelAsked = true;
  run.card.cancelling();
  if (!run.job) return;  // sent once the server has said which job it is
  try {
    await cancelJob(run.job.id);
  } catch (err) {
    // The job may have finished meanwhile; its own outcome event says how.
    if (!run.outcome) announce(`Could not cancel: ${errorText(err)}`);
  }
}

/**
 * Retry a failed run in its place. A job the server has (contact was lost while following it)
 * is followed again; otherwise the same settings go as a new job, whose card replaces this one.
 */
function retry(run) {
  if (run.lost) return refollow(run);
  const focused = run.card.node.contains(document.activeElement);
  run.card.remove({ focus: false });
  const running = launch(run.settings, run.body);  // its card is first in #runs at once
  if (focused) active.at(-1).card.node.focus({ preventScroll: true });
  return running;
}

/** Follow a run's job again in its card; when the server no longer has it, say so. */
async function refollow(run) {
  Object.assign(run, { lost: false, interrupted: true, outcome: null, endedAt: null,
                       cancelAsked: false });
  run.card.resumed();
  active.push(run);
  announce("Reconnecting to the job…");
  try {
    run.job = await api(`/v1/jobs/${encodeURIComponent(run.job.id)}`);
    await followRun(run);
  } catch (err) {
    if (err.status === 404) gone(run);
    else fail(run, err);
  } finally {
    settle(run);
  }
}

function gone(run) {
  const text = "The cluster no longer has this job: it was deleted, or lost before it finished. " +
               "Run it again to make it anew.";
  jobDeleted(run.job.id);
  run.job = null;
  run.card.failed(text, { reason: "gone" });
  announce(`Failed: ${text}`);
}

/** Run again with the same settings; seed: the one to use, null for a new random one. */
function again(run, seed) {
  const body = { ...run.body };
  if (seed === null || seed === undefined) delete body.seed;
  else body.seed = seed;
  return launch({ ...run.settings, seed: seed ?? null }, body);
}

/** The settings as JSON, the body of POST /v1/jobs, with the seed the run was made with. */
async function copySettings(run) {
  const seed = run.job?.seeds?.[0];
  const text = JSON.stringify(seed === undefined ? run.body : { ...run.body, seed }, null, 2);
  const what = run.settings.edit
    ? "the fields of POST /v1/jobs/edits, without the input image and mask"
    : "the body of POST /v1/jobs";
  try {
    await navigator.clipboard.writeText(text);
    toast(`Settings copied as JSON (${what})`);
  } catch {
    showCode(`Settings (JSON: ${what})`, text);  // it selects the text to copy
  }
}

/** Delete the run's job and images from the server, then its card; whether it went. */
async function remove(run) {
  try {
    await deleteJob(run.job.id);
  } catch (err) {
    if (err.status !== 404) {
      toast(`Could not delete: ${errorText(err)}`);
      return false;
    }
  }
  jobDeleted(run.job.id);
  run.card.remove();
  announce("Deleted");
  return true;
}
