// The model picker in the top bar: chat models from /api/models with their loaded state, EP and precision.
import { api, ApiError } from "./api.js";
import { updateControls } from "./messages.js";
import { pickNumeric, showSettings } from "./settings.js";
import { $, currentModelObject, DEFAULTS, state, store } from "./state.js";

export async function loadModels() {
  try {
    const { models } = await api.models();
    state.models = (models || []).filter((m) => (m.kind || "chat") === "chat");
    state.modelsError = "";
  } catch (err) {
    if (!(err instanceof ApiError)) return; // offline: the status indicator says so
    state.models = [];
    state.modelsError = err.status === 401 ? "API key required" : "models unavailable";
  }
  if (!state.models.some((m) => m.name === state.model)) {
    const loaded = state.models.find((m) => m.loaded);
    state.model = (loaded || state.models[0] || {}).name || "";
  }
  if (!store.get("settings") && currentModelObject()) {
    state.settings = { ...DEFAULTS, ...pickNumeric(currentModelObject().parameters || {}) };
    showSettings();
  }
  renderModels();
}

export function renderModels() {
  const select = $("model-select");
  select.replaceChildren();
  if (!state.models.length) {
    const option = new Option(state.modelsError || "no models installed", "");
    select.append(option);
    select.disabled = true;
  } else {
    select.disabled = false;
    for (const m of state.models) {
      const option = new Option(`${m.name}${m.loaded ? "" : " (not loaded)"}`, m.name);
      select.append(option);
    }
    select.value = state.model;
  }
  const m = currentModelObject();
  const info = $("model-info");
  info.replaceChildren();
  if (m) {
    const badge = document.createElement("span");
    badge.className = `badge ${m.loaded ? "ok" : "idle"}`;
    badge.textContent = m.loaded ? "loaded" : "not loaded";
    const ep = document.createElement("span");
    ep.className = "badge";
    ep.textContent = `EP ${m.ep || "cpu"}`;
    ep.title = m.ep_reason || "execution provider";
    info.append(badge, ep);
    if (m.quantization) {
      const q = document.createElement("span");
      q.className = "badge subtle";
      q.textContent = m.quantization;
      info.append(q);
    }
  }
}

/** Switch to `name` when it is an installed chat model (an opened conversation's own model). */
export function selectModel(name) {
  if (!state.models.some((m) => m.name === name)) return;
  state.model = name;
  store.set("model", state.model);
  renderModels();
}

export function bindModels() {
  $("model-select").addEventListener("change", () => {
    state.model = $("model-select").value;
    store.set("model", state.model);
    renderModels();
    updateControls();
  });
}
