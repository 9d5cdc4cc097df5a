// ortllm's browser chat, wired together at start: sessions from the server's store, answers streamed
// over the multi-turn WebSocket (SSE fallback), settings, regenerate, edit-and-branch, export, API key,
// themes. Each concern lives in its own module; this one only connects them.
import { bindKeyDialog } from "./apikey.js";
import { bindComposer, regenerate, startEdit, stop } from "./chat.js";
import { bindExport } from "./export.js";
import { applyIcons } from "./icons.js";
import { setMessageActions, updateControls } from "./messages.js";
import { bindModels, loadModels } from "./models.js";
import { bindSidebar, closeSidebar, loadSessions, openSession, showConversation } from "./sessions.js";
import { bindSettings, showSettings, toggleSettings } from "./settings.js";
import { $, state, store } from "./state.js";
import { connection, setReconnectHandler } from "./status.js";
import { bindTheme } from "./theme-switch.js";

async function refreshAll() {
  await loadModels();
  await loadSessions();
  updateControls();
}

/** Esc stops the answer, else closes the settings panel, else the narrow layout's sidebar. */
function bindEscape() {
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || e.defaultPrevented || document.querySelector("dialog[open]")) return;
    if (state.streaming) {
      e.preventDefault();
      stop();
    } else if (!$("settings").hidden) {
      toggleSettings(false);
    } else if (document.querySelector(".app").classList.contains("sidebar-open")) {
      closeSidebar();
    }
  });
}

async function init() {
  applyIcons();
  bindTheme();
  bindSettings();
  bindKeyDialog({ onSaved: refreshAll });
  setReconnectHandler(refreshAll);
  setMessageActions({ edit: startEdit, regenerate });
  bindSidebar();
  bindExport();
  bindModels();
  bindComposer();
  bindEscape();
  showSettings();
  showConversation();
  connection.start();
  await loadModels();
  await loadSessions();
  const saved = store.get("session");
  if (saved) await openSession(saved, { quiet: true });
  updateControls();
  $("composer-input").focus();
  document.documentElement.dataset.ready = "true";
}

init();
