// The cluster panel, from GET /v1/cluster every few seconds: workers, their state, queue depths.
import { api } from "./api.js";
import { $, el } from "./dom.js";
import { errorText, plural } from "./words.js";

const EVERY_MS = 3000;
let lastUpdate = null;

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
    lastUpdate = new Date();
  } catch (err) {
    $("summary").textContent = `cluster unreachable: ${errorText(err)}`;
    $("summary").dataset.state = "error";
    if (lastUpdate) $("cluster-updated").textContent = `as of ${lastUpdate.toLocaleTimeString()}`;
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
