// The history panel: the server's jobs, newest first, searchable by prompt, a page at a time.
// Each has Restore (its settings into the form); running ones can be watched or cancelled.
// Jobs shown as cards in the results on this page are left out, so no run shows twice; a card
// removed from the page comes back here. The last first page is kept in this browser and
// shown, marked offline, while the server cannot be reached.
import { $, el, toast } from "./dom.js";
import { restoreInput } from "./editor.js";
import { entryNode, settingsOf } from "./entry.js";
import { writeSettings } from "./form.js";
import { loadCache, saveCache } from "./historycache.js";
import { ACTIVE, deleteJob, getJob, listJobs, MAX_PAGE, PAGE } from "./jobs.js";
import { openLightbox } from "./lightbox.js";
import { chooseModel } from "./models.js";
import { errorText } from "./words.js";

const EVERY_MS = 10000;
const BUSY_EVERY_MS = 2000;  // while a listed job is queued or running
const SEARCH_DELAY_MS = 300;

let jobs = [];  // what the list shows, newest first
let listed = "";  // the search those jobs answer
let hasMore = false;
let offlineSince = null;  // when the list shown was saved, while the server cannot be reached
let asked = 0;  // how many lists were asked for: only the latest answer is shown
let timer = null;
let searchTimer = null;
const nodes = new Map();  // job id → {key, node}: an entry is drawn again only when it changed
const above = new Set();  // ids of the jobs shown as cards in the results on this page
let handlers = { watch: () => {}, cancel: () => {} };

const searched = () => $("history-search").value.trim();

const matches = (job, q) => (job.prompt || "").toLowerCase().includes(q.toLowerCase());

/** Ask for the newest jobs again (as many as are shown); older pages loaded stay below. */
async function refresh({ background = true } = {}) {
  const q = searched();
  const ask = ++asked;
  // Answers to an older question, or to a search since changed (its own answer is coming),
  // are dropped.
  const stale = () => ask !== asked || q !== searched();
  try {
    const shown = q === listed ? jobs : [];
    const limit = Math.min(MAX_PAGE, Math.max(PAGE, shown.length));
    const page = await listJobs({ limit, q }, { background });
    if (stale()) return;
    const cut = page.has_more ? shown.findIndex((job) => job.id === page.last_id) : -1;
    const older = cut >= 0 ? shown.slice(cut + 1) : [];
    jobs = [...page.data, ...older];
    listed = q;
    if (!older.length) hasMore = page.has_more;
    offlineSince = null;
    if (!q) saveCache(page.data);
    render();
  } catch (err) {
    if (!stale()) showFailure(err, q);
  } finally {
    schedule();
  }
}

function showFailure(err, q) {
  if (err.status !== 0 && err.status < 500) {
    $("history-note").textContent = `History could not be loaded: ${errorText(err)}`;
    $("history-list").setAttribute("aria-busy", "false");
    return;
  }
  // The server cannot be reached: keep what is shown, or show what this browser saved.
  const cache = loadCache();
  if (!jobs.length || offlineSince || q !== listed) {
    jobs = cache ? cache.jobs.filter((job) => matches(job, q)) : [];
    listed = q;
    hasMore = false;
  }
  offlineSince = offlineSince || (cache ? cache.saved : Date.now());
  render();
}

function schedule() {
  clearTimeout(timer);
  const busy = jobs.some((job) => ACTIVE.includes(job.status));
  timer = setTimeout(() => (document.hidden ? schedule() : refresh()),
                     busy ? BUSY_EVERY_MS : EVERY_MS);
}

async function loadMore() {
  const q = searched();
  if (q !== listed) return;  // the list is about to be replaced by the search's answer
  const button = $("history-more");
  button.disabled = true;
  try {
    const page = await listJobs({ before: jobs[jobs.length - 1].id, q });
    if (q !== searched() || q !== listed) return;
    const shown = new Set(jobs.map((job) => job.id));
    jobs.push(...page.data.filter((job) => !shown.has(job.id)));
    hasMore = page.has_more;
    render();
  } catch (err) {
    toast(`Could not load more: ${errorText(err)}`);
  } finally {
    button.disabled = false;
  }
}

/**
 * Put settings into the form (the model first: choosing one applies its limits), and an
 * edit's input and mask into the editor (fetched from the server for a job of the history).
 */
export async function restoreSettings(settings) {
  const served = chooseModel(settings.model, { defaults: false });
  writeSettings(settings);
  $("prompt").focus();
  const restored = await restoreInput(settings.edit);
  if (settings.edit && !restored) return;  // it said why
  const what = settings.edit && restored ? "Settings and input image restored" : "Settings restored";
  toast(served ? what : `${what}; ${settings.model} is not served right now`);
}

const restore = (job) => restoreSettings(settingsOf(job));

async function remove(job) {
  try {
    await deleteJob(job.id);
  } catch (err) {
    if (err.status !== 404) {
      toast(`Could not delete: ${errorText(err)}`);
      return;
    }
  }
  forget(job.id);
}

async function cancel(job) {
  try {
    await handlers.cancel(job);
  } catch (err) {
    toast(`Could not cancel: ${errorText(err)}`);
  }
  jobChanged(job.id);
}

const actions = {
  onOpen: (items, index) => openLightbox(items, index),
  onRestore: restore,
  onWatch: (job) => handlers.watch(job),
  onCancel: cancel,
  onDelete: remove,
};

function forget(id) {
  jobs = jobs.filter((job) => job.id !== id);
  if (!searched() && !offlineSince) saveCache(jobs);
  render();
}

function nodeOf(job) {
  const key = JSON.stringify(job);
  const known = nodes.get(job.id);
  if (known && known.key === key) return known.node;
  const node = entryNode(job, actions);
  node.querySelector(".entry-actions").prepend(el("button", {
    type: "button", class: "quiet entry-restore-button", onclick: () => restore(job),
    title: "Put these settings into the form", "aria-label": `Restore settings: ${job.prompt ?? "job"}`,
  }, "Restore"));
  nodes.set(job.id, { key, node });
  return node;
}

function noteText() {
  const q = searched();
  if (offlineSince) {
    if (!jobs.length) return "Offline: the server cannot be reached.";
    const when = new Date(offlineSince).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    return `Offline: the server cannot be reached. Shown: the history as saved here on ${when}.`;
  }
  if (listedJobs().length) return "";
  if (jobs.length) return "Runs shown in the results above are not repeated here.";
  return q ? `No generation matches “${q}”.` : "Generations you make are kept here, on the server.";
}

/** The jobs the list shows: those not shown as cards above. */
const listedJobs = () => jobs.filter((job) => !above.has(job.id));

function render() {
  const list = $("history-list");
  const wanted = listedJobs().map(nodeOf);
  for (const child of [...list.children]) if (!wanted.includes(child)) child.remove();
  wanted.forEach((node, index) => {
    if (list.children[index] !== node) list.insertBefore(node, list.children[index] || null);
  });
  const ids = new Set(jobs.map((job) => job.id));
  for (const id of nodes.keys()) if (!ids.has(id)) nodes.delete(id);
  list.setAttribute("aria-busy", String(listed !== searched()));
  $("history").dataset.offline = Boolean(offlineSince);
  $("history-note").textContent = noteText();
  $("history-more").hidden = !hasMore || Boolean(offlineSince);
}

/** A job this page just submitted: its card shows it; the list has it once the card goes. */
export function jobSubmitted(job) {
  above.add(job.id);
  const q = searched();
  if (q && !matches(job, q)) return;
  jobs = [job, ...jobs.filter((shown) => shown.id !== job.id)];
  render();
  schedule();
}

/** Whether a job is shown as a card in the results (then the list leaves it out). */
export function shownAbove(id, shown) {
  if (shown) above.add(id);
  else above.delete(id);
  render();
}

/** A job deleted from this page: gone from the list. */
export function jobDeleted(id) {
  forget(id);
}

/** Show a listed job as it is now on the server (gone, if it was deleted). */
export async function jobChanged(id) {
  try {
    const job = await getJob(id);
    jobs = jobs.map((shown) => (shown.id === id ? job : shown));
    if (!searched() && !offlineSince) saveCache(jobs);
    render();
  } catch (err) {
    if (err.status === 404) forget(id);
  }
}

/** handlers: {watch(job), cancel(job)}, from the module that follows jobs on this page. */
export function initHistory(given) {
  handlers = given;
  $("history-search").addEventListener("input", () => {
    $("history-list").setAttribute("aria-busy", String(listed !== searched()));
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => refresh({ background: false }), SEARCH_DELAY_MS);
  });
  $("history-more").addEventListener("click", loadMore);
  document.addEventListener("visibilitychange", () => document.hidden || refresh());
  window.addEventListener("online", () => refresh());
  return refresh({ background: false });
}
