// The page's one link to the server and the status indicator that shows it (connected, SSE, offline).
import { hideBanner } from "./banner.js";
import { Connection } from "./connection.js";
import { updateControls } from "./messages.js";
import { $ } from "./state.js";

const CONN_TEXT = { connecting: "connecting…", connected: "connected", reconnecting: "reconnecting…", offline: "offline" };

let onReconnected = () => {};
let wasOffline = false;

/** Called when the server is reachable again after being offline (app.js refreshes the lists). */
export function setReconnectHandler(handler) {
  onReconnected = handler;
}

export const connection = new Connection({
  onState(status, mode) {
    const el = $("conn");
    el.dataset.state = status;
    document.querySelector(".app").dataset.conn = status;
    el.dataset.mode = mode;
    $("conn-text").textContent = CONN_TEXT[status] + (status === "connected" && mode === "sse" ? " (SSE)" : "");
    el.title =
      status === "connected"
        ? mode === "sse"
          ? "Connected; streaming over HTTP (SSE) because the WebSocket is unavailable"
          : "Connected over WebSocket"
        : status === "offline"
          ? "The server cannot be reached; retrying automatically"
          : "Trying to reach the server";
    updateControls();
    if (status === "connected" && $("banner").dataset.kind === "offline") hideBanner();
    if (status === "connected" && wasOffline) onReconnected();
    wasOffline = status === "offline" || status === "reconnecting";
  },
});
