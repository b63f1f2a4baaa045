// Asking in place before a delete: the row's buttons give way to the question, Delete and Keep,
// and come back on Keep or when the delete did not happen. Run cards and History entries share it.
import { el } from "./dom.js";

/**
 * Ask in `row` before deleting. kind: the class prefix ("run" gives .run-confirm,
 * .run-delete-yes, .run-keep; the button that asked is .run-delete). remove(): awaited, says
 * whether it went.
 */
export function confirmDelete(row, { kind, question, remove }) {
  const restore = row.replaceChildren.bind(row, ...row.children);
  const back = () => {
    restore();
    row.querySelector(`.${kind}-delete`)?.focus();
  };
  const no = el("button", { type: "button", class: `quiet ${kind}-keep`, onclick: back }, "Keep");
  const yes = el("button", {
    type: "button", class: `quiet danger ${kind}-delete-yes`,
    onclick: async () => {
      yes.disabled = true;
      no.disabled = true;
      if (!(await remove())) back();
    },
  }, "Delete");
  row.replaceChildren(el("span", { class: `${kind}-confirm`, role: "alert" }, question), yes, no);
  no.focus();
}
