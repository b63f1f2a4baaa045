// "Show the run": a button at the foot of the screen while the newest run is out of sight, as it
// is on a phone below the whole form. One tap brings it into view; its text says how it goes.
import { $ } from "./dom.js";

const TEXT = {
  sending: "Sending your run", queued: "Your run is queued", running: "Generating",
  cancelling: "Cancelling", completed: "Your images are ready", failed: "Your run failed",
};
const GOING = ["sending", "queued", "running", "cancelling"];
// What "in view" leaves out: the top bar, and the button's band at the foot of the screen
// with a little above it. A card whose top edge peeks out over the button by a few pixels is
// not in view: the button must still show (a phone's form can end just there).
const TOP_HIDDEN = 64;
const BOTTOM_HIDDEN = 104;
let newest = null;  // the newest run's card
let inView = false;
let seen = true;  // whether the newest card has been in view since it started or ended

const observer = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (entry.target !== newest) continue;
    inView = entry.isIntersecting;
    if (inView) seen = true;
  }
  render();
}, { rootMargin: `-${TOP_HIDDEN}px 0px -${BOTTOM_HIDDEN}px 0px` });

function render() {
  const button = $("jump-results");
  const state = newest?.isConnected ? newest.dataset.state : null;
  const show = Boolean(state && TEXT[state] && !inView && (!seen || GOING.includes(state)));
  button.hidden = !show;
  if (!show) return;
  const below = newest.getBoundingClientRect().top > 0;
  const text = `${TEXT[state]} — show ${below ? "↓" : "↑"}`;
  if (button.textContent !== text) button.textContent = text;
}

function follow() {
  const card = document.querySelector("#runs .run");
  if (card !== newest) {
    if (newest) observer.unobserve(newest);
    newest = card;
    // Measured now, so the button does not flash up until the observer first reports.
    const where = card?.getBoundingClientRect();
    inView = Boolean(where && where.bottom > TOP_HIDDEN && where.top < innerHeight - BOTTOM_HIDDEN);
    seen = inView;
    if (card) observer.observe(card);
  }
  render();
}

function stateChanged(records) {
  const ended = records.some((r) => r.target === newest && !GOING.includes(newest.dataset.state));
  if (ended && !inView) seen = false;  // its outcome is news
  render();
}

export function initJump() {
  const runs = $("runs");
  new MutationObserver(follow).observe(runs, { childList: true });
  new MutationObserver(stateChanged).observe(runs, {
    subtree: true, attributes: true, attributeFilter: ["data-state"],
  });
  $("jump-results").addEventListener("click", () => {
    if (!newest) return;
    const still = matchMedia("(prefers-reduced-motion: reduce)").matches;
    newest.scrollIntoView({ block: "start", behavior: still ? "auto" : "smooth" });
    if (!newest.hasAttribute("tabindex")) newest.setAttribute("tabindex", "-1");
    newest.focus({ preventScroll: true });
    seen = true;
    render();
  });
  addEventListener("scroll", () => { if (!$("jump-results").hidden) render(); }, { passive: true });
  follow();
}
