// Wiring: each module owns one part of the page; this starts them and connects the form to runs.
import { initApiKey } from "./js/apikey.js";
import { initCluster } from "./js/cluster.js";
import { $, toast } from "./js/dom.js";
import { checkSettings, currentLimits, initForm, readSettings, requestBody, savedDraft,
         writeSettings } from "./js/form.js";
import { initHistory } from "./js/history.js";
import { initLightbox } from "./js/lightbox.js";
import { chooseModel, initModels, loadModels } from "./js/models.js";
import { cancelRun, startRun, watchJob } from "./js/runs.js";
import { initSnippets } from "./js/snippets.js";
import { errorText } from "./js/words.js";

const MODELS_EVERY_MS = 15000;

function generate() {
  const settings = readSettings();
  const problems = checkSettings(settings);
  if (Object.keys(problems).length) {
    toast("Check the highlighted settings");
    return;
  }
  startRun(settings, currentLimits());
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
  // Until a model is there, look again soon.
  setTimeout(refreshModels, currentLimits() ? MODELS_EVERY_MS : 2000);
}

initApiKey();
initLightbox();
initModels();
initForm({ onSubmit: generate });
initSnippets(() => requestBody(readSettings()));
initCluster();
initHistory({ watch: watchJob, cancel: cancelRun });
refreshModels();
