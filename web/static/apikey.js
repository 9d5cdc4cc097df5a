// The API key dialog: opened from the top bar, and by itself the first time the server answers 401.
import { getApiKey, setApiKey, setUnauthorizedHandler } from "./api.js";
import { hideBanner, showBanner } from "./banner.js";
import { $ } from "./state.js";
import { connection } from "./status.js";

let keyPromptShown = false;

function openKeyDialog(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent =
    reason || "If the server requires an API key, enter it here. It is kept in this browser only.";
  $("key-input").value = getApiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

/** `onSaved` runs after a new key is saved (app.js reloads what the old key could not read). */
export function bindKeyDialog({ onSaved }) {
  const dialog = $("key-dialog");
  $("key-btn").addEventListener("click", () => openKeyDialog());
  $("key-cancel").addEventListener("click", () => dialog.close());
  $("key-clear").addEventListener("click", () => {
    setApiKey("");
    $("key-input").value = "";
    dialog.close();
    connection.restart();
  });
  $("key-form").addEventListener("submit", () => {
    setApiKey($("key-input").value.trim());
    keyPromptShown = false;
    hideBanner();
    connection.restart();
    onSaved();
  });
  setUnauthorizedHandler(() => {
    const text = getApiKey()
      ? "The server rejected the API key. Enter a valid key."
      : "This server requires an API key. Enter it to continue.";
    showBanner(text, "error", { label: "Enter API key", run: () => openKeyDialog(text) });
    if (!keyPromptShown) {
      keyPromptShown = true;
      openKeyDialog(text);
    }
  });
}
