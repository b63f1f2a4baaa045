// The cluster panel, from GET /v1/cluster every few seconds: workers, their state, queue depths.
// Others (the model picker, the Generate button) hear each answer, or that none came.
import { api } from "./api.js";
import { $, el } from "./dom.js";
import { errorText, plural } from "./words.js";

const EVERY_MS = 3000;
let lastUpdate = null;
const listeners = [];

/** Call listener(status, error) after every poll: the status, or null and why there is none. */
export function onClusterChange(listener) {
  listeners.push(listener);
}

/** Whether an error means nobody can say what the cluster looks like (not a refused key). */
export const unreachable = (err) => err && (err.status === 0 || err.status >= 500);

function workerState(worker) {
  if (worker.state !== "ready") return worker.state;
  return worker.running.length ? "busy" : "idle";
}

function workerItem(worker) {
  const state = workerState(worker);
  const running = worker.running.length > 1 ? ` ×${worker.running.length}` : "";
  return el("li", { class: "worker", dataset: { state }, title: worker.worker_id },
    el("span", { class: "dot", "aria-hidden": "true" }),
    el("span", { class: "worker-where" },
      el("strong", {}, worker.host), " ", el("span", { class: "worker-device" }, worker.device)),
    el("span", { class: "worker-state" }, state + running),
    el("span", { class: "worker-detail" },
      `${worker.models.join(", ")} · ${worker.jobs_done} done`));
}

function queueItems(status) {
  const depths = { ...status.queues };
  for (const worker of status.workers) for (const model of worker.models) depths[model] ??= 0;
  return Object.entries(depths).sort().map(([model, depth]) =>
    el("li", {}, el("span", {}, model), el("strong", {}, depth === 0 ? "empty" : `${depth} queued`)));
}

function summaryText(status) {
  const ready = status.workers.filter((w) => w.state === "ready");
  const busy = ready.filter((w) => w.running.length).length;
  const queued = Object.values(status.queues).reduce((sum, depth) => sum + depth, 0);
  if (!status.workers.length) return "no workers yet";
  return [plural(ready.length, "worker"), busy ? `${busy} busy` : null,
          queued ? `${queued} queued` : null].filter(Boolean).join(" · ");
}

export async function refreshCluster() {
  try {
    const status = await api("/v1/cluster", { background: true });
    $("workers").replaceChildren(...status.workers.map(workerItem));
    if (!status.workers.length) {
      $("workers").append(el("li", { class: "empty" }, "No worker has joined yet."));
    }
    $("queues").replaceChildren(...queueItems(status));
    $("summary").textContent = summaryText(status);
    $("summary").dataset.state = "ok";
    $("cluster-updated").textContent = "";
    $("cluster").dataset.state = "ok";
    lastUpdate = new Date();
    tell(status, null);
  } catch (err) {
    showUnknown(err);
    tell(null, err);
  }
}

/** No answer: what the panel showed may no longer be true, so it says "unknown" instead. */
function showUnknown(err) {
  $("summary").textContent = `cluster unreachable: ${errorText(err)}`;
  $("summary").dataset.state = "error";
  $("cluster").dataset.state = "unknown";
  const since = lastUpdate ? `; last answer at ${lastUpdate.toLocaleTimeString()}` : "";
  $("cluster-updated").textContent = "unknown";
  $("workers").replaceChildren(el("li", { class: "empty unknown" },
    `Workers unknown: no answer from the cluster${since}.`));
  $("queues").replaceChildren(el("li", { class: "unknown" }, el("span", {}, "Queues"),
                                 el("strong", {}, "unknown")));
}

function tell(status, err) {
  for (const listener of listeners) {
    try {
      listener(status, err);
    } catch (problem) {
      console.error(problem);  // one broken listener must not stop the others
    }
  }
}

export function initCluster() {
  refreshCluster();
  setInterval(() => {
    if (!document.hidden) refreshCluster();
  }, EVERY_MS);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshCluster();
  });
}
