// Every call to the HTTP API goes through here: the API key, and errors in OpenAI's shape.
import { askForKey, currentKey } from "./apikey.js";

export class ApiError extends Error {
  constructor(status, { message, param = null, code = null }, retryAfter = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/**
 * fetch() with the key; a 401 asks for a key and tries again until one works or the person
 * gives up. Background calls (polling) stop asking once the person has dismissed the dialog.
 */
export async function send(path, { background = false, ...options } = {}) {
  for (;;) {
    const key = currentKey();
    const headers = { ...options.headers, ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, { message: "the server cannot be reached; is the cluster running?" });
    }
    if (response.status !== 401) return response;
    const error = await errorOf(response);
    const reason = key ? "The server did not accept this API key. Check it, or enter another."
                       : "This server needs an API key. Its administrator can give you one.";
    if (!(await askForKey(reason, { background }))) throw error;
  }
}

/**
 * A JSON call: the parsed body, or an ApiError with the server's message. `form` (FormData) is
 * sent as multipart/form-data instead of a JSON `body`.
 */
export async function api(path, { method = "GET", body, form, background = false } = {}) {
  const options = { method, background, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  } else if (form !== undefined) {
    options.body = form;  // fetch writes its Content-Type, with the boundary
  }
  const response = await send(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch { /* not JSON: a proxy's error page, say */ }
  const retry = Number(response.headers.get("Retry-After")) || null;
  const error = body && body.error && typeof body.error.message === "string"
    ? body.error
    : { message: `the server answered ${response.status} ${response.statusText}`.trim() };
  return new ApiError(response.status, error, retry);
}
