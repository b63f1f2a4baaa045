// The jobs API as the history and the runs use it: list, look up, cancel.
import { api } from "./api.js";

export const ACTIVE = ["queued", "running"];
export const PAGE = 20;  // jobs in one page of GET /v1/jobs
export const MAX_PAGE = 100;  // the most the server gives in one page

/** One page of jobs, newest first: {data, has_more, last_id}. */
export function listJobs({ limit = PAGE, before = null, q = "" } = {},
                         { background = false } = {}) {
  const params = new URLSearchParams({ limit });
  if (before) params.set("before", before);
  if (q) params.set("q", q);
  return api(`/v1/jobs?${params}`, { background });
}

/** The job as the list shows it (without its result, which may hold the images' bytes). */
export async function getJob(id) {
  const { result, ...job } = await api(`/v1/jobs/${encodeURIComponent(id)}`, { background: true });
  return job;
}

/** Cancel a job that is still queued or running; one that just finished is left alone (the
 * server's cancel never deletes, unlike DELETE). */
export function cancelJob(id) {
  return api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
}

/** Remove a finished job and its images from the server; cancel a running one. */
export function deleteJob(id) {
  return api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}
