// A generation's life: POST /v1/jobs, follow its events, cancel it, show its images. A job
// from the history (another tab's or device's, say) can be followed the same way.
import { api, ApiError, errorOf, send } from "./api.js";
import { $ } from "./dom.js";
import { settingsOf } from "./entry.js";
import { requestBody, showProblem, useSeed } from "./form.js";
import { jobChanged, jobSubmitted } from "./history.js";
import { blobOf, filename } from "./images.js";
import { cancelJob } from "./jobs.js";
import { openLightbox } from "./lightbox.js";
import { RunCard } from "./runcard.js";
import { readEvents } from "./sse.js";
import { withStream } from "./streams.js";
import { errorText, plural } from "./words.js";

const PREVIEWS = 3;  // partial_images asked for when live previews are on
const RECONNECTS = 4;
const FINISHED = { succeeded: "completed", failed: "failed", cancelled: "cancelled" };
const runs = new Map();  // job id → the run following it on this page

function announce(text) {
  $("status").textContent = text;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function newRun(settings, { watched = false } = {}) {
  const run = { settings, job: null, outcome: null, cancelAsked: false, watched };
  run.card = new RunCard(settings, {
    onCancel: () => cancel(run),
    onOpen: (images, index) => openLightbox(images, index),
    onSeed: (seed) => useSeed(seed),
  });
  $("runs-empty").hidden = true;
  $("runs").prepend(run.card.node);
  return run;
}

/** Start a generation with these (already checked) settings. */
export async function startRun(settings, limits) {
  const body = { ...requestBody(settings, limits), partial_images: settings.previews ? PREVIEWS : 0 };
  const run = newRun(settings);
  try {
    run.job = await api("/v1/jobs", { method: "POST", body });
    jobSubmitted(run.job);
    await followRun(run);
  } catch (err) {
    fail(run, err);
  }
}

/** Follow a job this page did not start, from the history; one already followed is shown. */
export async function watchJob(job) {
  const open = runs.get(job.id);
  if (open) {
    open.card.node.scrollIntoView({ block: "nearest" });
    return;
  }
  const run = newRun({ ...settingsOf(job), prompt: job.prompt ?? "" }, { watched: true });
  run.job = job;
  run.card.node.scrollIntoView({ block: "nearest" });
  try {
    await followRun(run);
  } catch (err) {
    fail(run, err);
  }
}

/** Cancel a job: through its run when this page follows it, so the run says who cancelled. */
export function cancelRun(job) {
  const run = runs.get(job.id);
  return run ? cancel(run) : cancelJob(job.id);
}

async function followRun(run) {
  runs.set(run.job.id, run);
  try {
    run.card.accepted(run.job);
    if (run.job.status === "running") run.card.progress(run.job.step, run.job.steps);
    announce(run.watched ? `Following: ${plural(run.job.n, "image")}`
                         : `Queued: ${plural(run.job.n, "image")}`);
    if (run.cancelAsked) cancel(run);  // Cancel was pressed while the job was being sent
    await withStream(() => follow(run), () => pollStatus(run));
    await conclude(run);
  } finally {
    runs.delete(run.job.id);
    jobChanged(run.job.id);
  }
}

function fail(run, err) {
  const error = err instanceof ApiError ? err : { message: `something went wrong in this page: ${err.message}` };
  run.card.failed(errorText(error));
  if (error.param && !run.watched) showProblem(error.param, error.message);
  announce(`Failed: ${errorText(error)}`);
}

/** The job's status while it waits for an event stream; true once it has ended. */
async function pollStatus(run) {
  try {
    const job = await api(`/v1/jobs/${run.job.id}`, { background: true });
    if (job.status === "queued") run.card.queued(job.position);
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
    if (name === "queued") run.card.queued(data.position);
    else if (name === "progress") {
      run.steps = data.steps;
      run.card.progress(data.step, data.steps);
    }
    else if (name === "preview") showPreview(run, data);
    else if (["completed", "failed", "cancelled"].includes(name)) run.outcome = { name, data };
    return Boolean(run.outcome);
  });
}

async function showPreview(run, { image_index: index, step, b64_json: b64, output_format: format }) {
  // Previews carry no step count; the last progress event's is right even for two-stage models.
  run.card.progress(step, run.steps || run.job.steps);
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
    run.card.completed(images, data);
    announce(`Done: ${plural(images.length, "image")}`);
  }
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
