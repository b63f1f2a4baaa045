// Wiring: each module owns one part of the page; this starts them and connects the form to runs.
import { initApiKey } from "./js/apikey.js";
import { initCluster, onClusterChange, unreachable } from "./js/cluster.js";
import { $, toast } from "./js/dom.js";
import { currentEdit, editMode, initEditor } from "./js/editor.js";
import { blockGenerate, checkSettings, currentLimits, generateBlocked, generateBusy, initForm,
         readSettings, requestBody, savedDraft, writeSettings } from "./js/form.js";
import { initHistory } from "./js/history.js";
import { initJump } from "./js/jump.js";
import { initLightbox } from "./js/lightbox.js";
import { chooseModel, clusterChanged, generateBlocker, initModels, loadModels, renderModels }
  from "./js/models.js";
import { cancelRun, startRun, watchJob } from "./js/runs.js";
import { initShortcuts } from "./js/shortcuts.js";
import { initSnippets } from "./js/snippets.js";
import { errorText } from "./js/words.js";

const MODELS_EVERY_MS = 15000;
let wasUnreachable = false;

async function generate() {
  const blocked = generateBlocked();
  if (blocked) {
    toast(blocked);
    return;
  }
  const settings = { ...readSettings(), edit: await currentEdit() };
  const problems = checkSettings(settings);
  if (Object.keys(problems).length) {
    toast("Check the highlighted settings");
    return;
  }
  const accepted = generateBusy();
  const running = startRun(settings, currentLimits());
  whenSent(document.querySelector("#runs .run"), running).then(accepted);
}

/** Resolves once the server has taken the job (its card leaves "sending") or the run ended.
 * startRun puts the run's card first in #runs before it sends anything. */
function whenSent(card, running) {
  return new Promise((resolve) => {
    const observer = new MutationObserver(() => {
      if (card.dataset.state !== "sending") done();
    });
    const done = () => {
      observer.disconnect();
      resolve();
    };
    if (card) observer.observe(card, { attributes: true, attributeFilter: ["data-state"] });
    running.finally(done);
  });
}

/** The body "Copy as curl" and "Copy as Python" send: an edit's has the input's size. */
function snippetBody() {
  const body = requestBody(readSettings());
  if (editMode()) {
    delete body.size;
    body.strength = Number($("strength").value);
  }
  return body;
}

/** Load the models; the first time one is there, choose it and put back the last draft. */
async function refreshModels() {
  const hadLimits = Boolean(currentLimits());
  try {
    const list = await loadModels();
    $("form-error").hidden = true;
    if (!hadLimits && currentLimits()) {
      const draft = savedDraft();
      if (draft && list.some((m) => m.id === draft.model)) {
        chooseModel(draft.model);
        writeSettings(draft);
      }
    }
  } catch (err) {
    $("form-error").textContent = `Models could not be loaded: ${errorText(err)}`;
    $("form-error").hidden = false;
  }
  refreshGo();
  clearTimeout(refreshModels.timer);
  // Until a model is there, look again soon.
  refreshModels.timer = setTimeout(refreshModels, currentLimits() ? MODELS_EVERY_MS : 2000);
}

function refreshGo() {
  blockGenerate(generateBlocker());
}

initApiKey();
initLightbox();
initModels({ changed: refreshGo });
initEditor({ changed: renderModels });
initForm({ onSubmit: generate });
initSnippets(snippetBody, editMode);
onClusterChange((status, err) => {
  clusterChanged(status, err);
  // Back after an outage: the models (and their limits) may have changed meanwhile.
  if (wasUnreachable && status) refreshModels();
  wasUnreachable = unreachable(err);
});
initCluster();
initHistory({ watch: watchJob, cancel: cancelRun });
initShortcuts();
initJump();
refreshModels();
