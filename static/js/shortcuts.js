// Keyboard shortcuts beyond the form's own (Ctrl+Enter generates): Esc cancels the run that has
// the focus, else the newest one still going. Not from a dialog (Esc closes it), nor from a
// one-line field or a list, where Esc is theirs (a search box clears); from the prompt it
// works, since Ctrl+Enter is pressed there and Esc means nothing in a textarea.
import * as runs from "./runs.js";
import { toast } from "./dom.js";

const GOING = ["sending", "queued", "running"];
const NOT_TEXT = ["button", "checkbox", "color", "file", "radio", "range", "reset", "submit"];

/** Whether Esc belongs to the focused field rather than to the page. */
function ownsEscape(node) {
  if (!(node instanceof HTMLElement)) return false;
  if (node.isContentEditable || node.tagName === "SELECT") return true;
  return node.tagName === "INPUT" && !NOT_TEXT.includes(node.type);
}

const going = (card) => card && GOING.includes(card.dataset.state);

function cancelCard(card) {
  const button = card.querySelector(".run-cancel");
  if (!button || button.hidden || button.disabled) return false;
  button.click();
  return true;
}

/** Cancel the focused run, else the newest one still going; false when there is none. */
export function cancelFocusedOrLatest(from = document.activeElement) {
  // runs.js knows its runs (those still being sent too); without its help, the cards' buttons.
  if (typeof runs.cancelLatestRun === "function") return runs.cancelLatestRun();
  const focused = from?.closest?.("#runs .run");
  const card = going(focused) ? focused : [...document.querySelectorAll("#runs .run")].find(going);
  return Boolean(card) && cancelCard(card);
}

export function initShortcuts() {
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || event.defaultPrevented || event.repeat || event.isComposing) {
      return;
    }
    if (event.ctrlKey || event.altKey || event.metaKey || event.shiftKey) return;
    if (document.querySelector("dialog[open]") || ownsEscape(event.target)) return;
    if (cancelFocusedOrLatest(event.target)) {
      event.preventDefault();
      toast("Cancelling the run (Esc)");
    }
  });
}
