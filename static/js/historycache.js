// The last first page of the history, kept in localStorage so the panel has something to show
// while the server cannot be reached. The server's list always replaces it.
import { currentKey } from "./apikey.js";

const STORAGE = "dc-history-cache";
const MAX_JOBS = 20;

/** A short tag of the API key, so one key's cached jobs are not shown under another. */
function keyTag() {
  let hash = 5381;
  for (const char of currentKey()) hash = (hash * 33 + char.charCodeAt(0)) >>> 0;
  return hash.toString(36);
}

export function saveCache(jobs) {
  const cache = { key: keyTag(), saved: Date.now(), jobs: jobs.slice(0, MAX_JOBS) };
  try {
    localStorage.setItem(STORAGE, JSON.stringify(cache));
  } catch { /* storage full or blocked: the cache is a convenience */ }
}

/** {saved (ms), jobs} last saved under this API key, or null. */
export function loadCache() {
  try {
    const cache = JSON.parse(localStorage.getItem(STORAGE));
    return cache && cache.key === keyTag() && Array.isArray(cache.jobs) ? cache : null;
  } catch {
    return null;
  }
}
