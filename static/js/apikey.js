// The API key: asked for when the server answers 401, kept in localStorage, sent on every call.
import { $ } from "./dom.js";

const STORAGE = "dc-api-key";
let pending = null;
let declined = false;  // the person dismissed the dialog: background refreshes stop asking

export function currentKey() {
  try {
    return localStorage.getItem(STORAGE) || "";
  } catch {
    return "";  // storage blocked: the key lasts until the page closes
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(STORAGE, key);
    else localStorage.removeItem(STORAGE);
  } catch { /* storage blocked */ }
  showKeyButton();
}

function showKeyButton() {
  $("key-button").hidden = !currentKey() && !declined;
}

/**
 * Ask for a key; resolves to the new key, or "" when the person dismissed the dialog.
 * Requests that fail together share one dialog.
 */
export function askForKey(reason, { background = false } = {}) {
  if (background && declined) return Promise.resolve("");
  pending ||= openDialog(reason).finally(() => { pending = null; });
  return pending;
}

function openDialog(reason) {
  const dialog = $("key-dialog");
  const input = $("key-input");
  $("key-reason").textContent = reason;
  input.value = currentKey();
  $("key-forget").hidden = !currentKey();
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue === "save") storeKey(input.value.trim());
      if (dialog.returnValue === "forget") storeKey("");
      declined = dialog.returnValue !== "save";
      showKeyButton();
      resolve(dialog.returnValue === "save" ? currentKey() : "");
    }, { once: true });
  });
}

export function initApiKey() {
  showKeyButton();
  // Only Save submits the dialog's form, so Enter in the key field saves.
  $("key-forget").addEventListener("click", () => $("key-dialog").close("forget"));
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  $("key-button").addEventListener("click", () => {
    askForKey("The key is sent as a bearer token with every request from this browser.");
  });
}
