// The playground page: a model list, one live session of the chosen model, and its panel
// (typing for symbol models, a streamed signal for value models).

import { ApiError, apiKey, setApiKey } from "./api.js";
import { loadModels, renderModels } from "./models.js";
import { Session } from "./session.js";
import { SymbolPanel, typeable } from "./symbols.js";
import { ValuePanel } from "./values.js";

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const page = {
  session: null,
  panel: null,
  choice: null,
};

function showError(error) {
  const box = $("error");
  if (!error) {
    box.replaceChildren();
    delete box.dataset.code;
    return;
  }
  const code = error instanceof ApiError ? error.code : "page_error";
  const status = error instanceof ApiError && error.status ? ` (HTTP ${error.status})` : "";
  const strong = document.createElement("strong");
  strong.textContent = code;
  box.replaceChildren(strong, `${status}: ${error.message}`);
  box.dataset.code = code;
}

function renderSession() {
  const session = page.session;
  $("session-model").textContent = session ? `${session.model} v${session.version}` : "—";
  $("session-id").textContent = session && session.id ? session.id : "—";
  $("step-count").textContent = session ? String(session.stepCount) : "0";
  renderExpiry();
  for (const testid of ["reset", "new-session", "export-state"]) $(testid).disabled = !session;
}

function renderExpiry() {
  const session = page.session;
  const node = $("session-expiry");
  if (!session || !session.expiresAt) {
    node.textContent = "—";
    return;
  }
  const left = Math.round((session.expiresAt - Date.now()) / 1000);
  const when = new Date(session.expiresAt).toLocaleTimeString();
  node.textContent = session.dead ? "expired: open a new session" : left > 0 ? `${when} (in ${left} s)` : `${when} (due)`;
}

async function choose(model, version, card) {
  page.choice = { model, version, card };
  if (page.panel && page.panel.dispose) page.panel.dispose();
  const previous = page.session;
  page.session = null;
  page.panel = null;
  if (previous) previous.close();
  showError(null);
  for (const item of document.querySelectorAll(".model")) {
    item.classList.toggle("selected", item.dataset.testid === `model-${model}`);
  }
  const session = new Session(model, version, card);
  session.onChange(() => {
    if (page.session === session) renderSession();
  });
  const root = $("model-panel");
  root.replaceChildren();
  $("model-title").textContent = `${model} v${version}`;
  try {
    await session.open();
  } catch (error) {
    showError(error);
    renderSession();
    return;
  }
  page.session = session;
  page.panel = typeable(card) ? new SymbolPanel(root, session, showError) : new ValuePanel(root, session, showError);
  renderSession();
}

function onSession(task) {
  const session = page.session;
  if (!session) return;
  session
    .exclusive(() => task(session))
    .then(() => showError(null))
    .catch(showError);
}

function download(name, data) {
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 1)], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function refreshModels() {
  try {
    const models = await loadModels();
    renderModels($("model-list"), models, choose);
    showError(null);
  } catch (error) {
    $("model-list").replaceChildren();
    showError(error);
  }
}

function wire() {
  const key = $("api-key");
  key.value = apiKey();
  $("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key.dispatchEvent(new Event("change"));
  });
  key.addEventListener("change", () => {
    setApiKey(key.value.trim());
    refreshModels();
  });
  $("reset").addEventListener("click", () =>
    onSession(async (session) => {
      await session.reset();
      if (page.panel) page.panel.clear();
    }),
  );
  $("new-session").addEventListener("click", () => {
    if (page.choice) choose(page.choice.model, page.choice.version, page.choice.card);
  });
  $("export-state").addEventListener("click", () =>
    onSession(async (session) => {
      const state = await session.exportState();
      download(`${session.model}-v${session.version}-${session.id}-step${state.step_count}.json`, state);
    }),
  );
  setInterval(renderExpiry, 1000);
  renderSession();
  refreshModels();
}

wire();
