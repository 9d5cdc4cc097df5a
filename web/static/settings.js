// The settings panel: sampling options, system prompt and stop sequences, kept in the browser.
import { api } from "./api.js";
import { showBanner } from "./banner.js";
import { $, currentModelObject, DEFAULTS, state, store } from "./state.js";

const NUMERIC = Object.keys(DEFAULTS);
const INTEGER = new Set(["top_k", "max_tokens"]);

function clampSetting(key, value) {
  const input = $(`${key}-num`);
  let v = Number(value);
  if (!Number.isFinite(v)) v = DEFAULTS[key];
  v = Math.min(Number(input.max), Math.max(Number(input.min), v));
  return INTEGER.has(key) ? Math.round(v) : v;
}

/** The numeric settings among a model's default parameters. */
export function pickNumeric(params) {
  const out = {};
  for (const key of NUMERIC) if (typeof params[key] === "number") out[key] = params[key];
  return out;
}

/** Show the current settings in the panel (the open conversation's system prompt, else the default). */
export function showSettings() {
  for (const key of NUMERIC) {
    $(`${key}-num`).value = state.settings[key];
    $(`${key}-range`).value = state.settings[key];
  }
  $("stop-seqs").value = state.stopText;
  $("system-prompt").value = state.current ? state.current.system_prompt || "" : state.systemDefault;
}

export function toggleSettings(open) {
  const panel = $("settings");
  const show = open ?? panel.hidden;
  panel.hidden = !show;
  $("settings-btn").setAttribute("aria-expanded", String(show));
  document.querySelector(".app").classList.toggle("with-settings", show);
  if (show) $("temperature-num").focus();
  else $("settings-btn").focus();
}

/** The stop sequences, one per line; `\n` and `\t` typed as text stand for the characters. */
export function stopSequences() {
  return state.stopText
    .split("\n")
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
    .filter((s) => s.trim() !== "");
}

/** The system prompt as the panel shows it now ("" for none). */
export function systemPrompt() {
  return $("system-prompt").value.trim();
}

export function bindSettings() {
  for (const key of NUMERIC) {
    const range = $(`${key}-range`);
    const num = $(`${key}-num`);
    range.addEventListener("input", () => {
      state.settings[key] = clampSetting(key, range.value);
      num.value = state.settings[key];
      store.set("settings", state.settings);
    });
    num.addEventListener("input", () => {
      if (num.value === "" || !num.checkValidity()) return;
      state.settings[key] = clampSetting(key, num.value);
      range.value = state.settings[key];
      store.set("settings", state.settings);
    });
    num.addEventListener("change", () => {
      state.settings[key] = clampSetting(key, num.value);
      num.value = state.settings[key];
      range.value = state.settings[key];
      store.set("settings", state.settings);
    });
  }
  $("stop-seqs").addEventListener("input", () => {
    state.stopText = $("stop-seqs").value;
    store.set("stop", state.stopText);
  });
  $("system-prompt").addEventListener("change", async () => {
    const value = $("system-prompt").value;
    state.systemDefault = value;
    store.set("system", value);
    if (state.current) {
      state.current.system_prompt = value;
      try {
        await api.updateSession(state.current.id, { system_prompt: value });
      } catch (err) {
        showBanner(`Could not save the system prompt: ${err.message}`);
      }
    }
  });
  $("settings-reset").addEventListener("click", () => {
    state.settings = { ...DEFAULTS, ...pickNumeric(currentModelObject()?.parameters || {}) };
    state.stopText = "";
    store.set("settings", null);
    store.set("stop", null);
    showSettings();
  });
  $("settings-btn").addEventListener("click", () => toggleSettings());
  $("settings-close").addEventListener("click", () => toggleSettings(false));
}
