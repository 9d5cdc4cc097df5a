// The live link to the server: a multi-turn WebSocket on /chat/ws with automatic reconnect,
// the connection state for the status indicator, and the switch to the SSE fallback when
// WebSockets cannot be opened while the server itself answers.
import { api, getApiKey } from "./api.js";

const WS_FAILURES_BEFORE_SSE = 2;
const MAX_DELAY_MS = 3000;
const SSE_POLL_MS = 5000;
const CANCEL_GRACE_MS = 5000;
const HEARTBEAT_MS = 5000; // while the socket is open: a server shutting down keeps idle sockets open a while

export class Connection {
  /** onState(state, mode): state is connecting | connected | reconnecting | offline; mode ws | sse */
  constructor({ onState }) {
    this.onState = onState;
    this.ws = null;
    this.state = "connecting";
    this.mode = "ws";
    this.reportedMode = "ws";
    this.active = null; // the answer being streamed over the socket
    this.wsFailures = 0;
    this.attempt = 0;
    this.everConnected = false;
    this.timer = null;
    addEventListener("offline", () => this.setState("offline"));
    addEventListener("online", () => this.restart());
  }

  setState(state, mode = this.mode) {
    if (state === "connected") this.everConnected = true;
    if (state !== this.state || mode !== this.reportedMode) {
      this.state = state;
      this.mode = mode;
      this.reportedMode = mode;
      this.onState(state, mode);
    }
  }

  start() {
    this.connect();
  }

  /** Reconnect now (a new API key, the browser back online). */
  restart() {
    clearTimeout(this.timer);
    this.wsFailures = 0;
    this.attempt = 0;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      ws.close();
      this.failActive("The connection was restarted");
    }
    this.mode = "ws";
    this.connect();
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const key = getApiKey();
    return `${scheme}://${location.host}/chat/ws?mode=multi${key ? `&token=${encodeURIComponent(key)}` : ""}`;
  }

  connect() {
    clearTimeout(this.timer);
    let opened = false;
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch {
      this.wsFailures++;
      this.probe();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this.wsFailures = 0;
      this.attempt = 0;
      this.setState("connected", "ws");
      this.heartbeat(ws);
    };
    ws.onmessage = (event) => this.frame(typeof event.data === "string" ? event.data : "");
    ws.onclose = () => {
      if (this.ws !== ws) return;
      if (!opened) this.wsFailures++;
      this.drop(ws);
    };
  }

  /** Forget a socket that closed or stopped answering, then find out whether the server is still there. */
  drop(ws) {
    ws.onclose = null;
    if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close();
    if (this.ws === ws) this.ws = null;
    clearTimeout(this.beat);
    this.failActive("The connection to the server was lost");
    if (this.state === "connected" && this.mode === "ws") this.setState("reconnecting");
    this.probe();
  }

  /** While the socket is idle, check that the server still accepts requests; if not, drop the socket. */
  heartbeat(ws) {
    clearTimeout(this.beat);
    this.beat = setTimeout(async () => {
      if (this.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      if (this.active) return this.heartbeat(ws); // tokens arriving prove the link
      let up = false;
      try {
        up = await api.health();
      } catch {
        up = false;
      }
      if (this.ws !== ws) return;
      if (up) this.heartbeat(ws);
      else this.drop(ws);
    }, HEARTBEAT_MS);
  }

  /** After a failure: is the server there at all? Then retry the socket, or fall back to SSE. */
  async probe() {
    clearTimeout(this.timer);
    let up = false;
    try {
      up = await api.health();
    } catch {
      up = false;
    }
    if (!up) {
      this.mode = "ws";
      this.wsFailures = 0;
      this.setState("offline");
      this.retry(() => this.probe());
      return;
    }
    if (this.wsFailures >= WS_FAILURES_BEFORE_SSE) {
      // the server answers HTTP but not WebSockets (a proxy, an old server): stream over SSE
      this.attempt = 0;
      this.setState("connected", "sse");
      this.timer = setTimeout(() => this.pollSse(), SSE_POLL_MS);
      return;
    }
    if (this.state !== "connected") this.setState(this.everConnected ? "reconnecting" : "connecting");
    this.retry(() => this.connect());
  }

  /** In SSE mode the server is watched with /health; when it comes back, the socket is tried again. */
  async pollSse() {
    if (this.mode !== "sse") return;
    let up = false;
    try {
      up = await api.health();
    } catch {
      up = false;
    }
    if (up) {
      this.setState("connected");
      this.timer = setTimeout(() => this.pollSse(), SSE_POLL_MS);
    } else {
      this.mode = "ws";
      this.wsFailures = 0;
      this.setState("offline");
      this.retry(() => this.probe());
    }
  }

  retry(fn) {
    const delay = Math.min(MAX_DELAY_MS, 500 * 2 ** Math.min(this.attempt, 4));
    this.attempt++;
    this.timer = setTimeout(fn, delay);
  }

  get usesWebSocket() {
    return this.mode === "ws" && this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /**
   * Send one chat request over the socket. handlers: onStart(info), onToken(text), onEnd(info), onError(msg).
   * Returns { cancel() }, or null when no socket is open (use the SSE fallback).
   */
  send(payload, handlers) {
    if (!this.usesWebSocket || this.active) return null;
    const answer = { ...handlers, finished: false };
    this.active = answer;
    this.ws.send(JSON.stringify(payload));
    return {
      cancel: () => {
        if (answer.finished) return;
        try {
          this.ws?.send(JSON.stringify({ action: "cancel" }));
        } catch {
          /* the socket is closing: failActive ends the answer */
        }
        // a server that never confirms still frees the page
        setTimeout(() => {
          if (!answer.finished) this.finish(answer, "end", { finish_reason: "cancelled" });
        }, CANCEL_GRACE_MS);
      },
    };
  }

  finish(answer, kind, value) {
    if (answer.finished) return;
    answer.finished = true;
    if (this.active === answer) this.active = null;
    if (kind === "end") answer.onEnd(value);
    else answer.onError(value);
  }

  failActive(message) {
    if (this.active) this.finish(this.active, "error", message);
  }

  frame(text) {
    const answer = this.active;
    if (text.startsWith("__START__:")) {
      if (answer) answer.onStart(parseJson(text.slice(10)));
    } else if (text.startsWith("__END__:")) {
      if (answer) this.finish(answer, "end", parseJson(text.slice(8)));
    } else if (text.startsWith("__ERROR__:")) {
      if (answer) this.finish(answer, "error", text.slice(10).trim() || "generation failed");
    } else if (answer && text) {
      answer.onToken(text);
    }
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text) || {};
  } catch {
    return {};
  }
}
