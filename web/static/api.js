// The server's HTTP API as the page uses it: API key on every call, clear errors, the SSE fallback.

const KEY_STORAGE = "ortllm.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lasts for this page only */
  }
}

/** Called with the response whenever the server answers 401 (the page asks for a key). */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const key = getApiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    const detail = body.detail ?? body.error?.message ?? body.error ?? body.message;
    if (detail) return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    /* not JSON */
  }
  return text.slice(0, 300) || `${response.status} ${response.statusText}`;
}

export async function request(method, path, body, { signal } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) onUnauthorized(message);
    throw new ApiError(response.status, message);
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const api = {
  health: () =>
    fetch("/health", { headers: { Accept: "application/json" }, cache: "no-store", signal: AbortSignal.timeout(5000) }).then(
      (r) => r.ok,
    ),
  models: () => request("GET", "/api/models"),
  sessions: () => request("GET", "/api/sessions"),
  session: (id) => request("GET", `/api/sessions/${encodeURIComponent(id)}`),
  createSession: (body) => request("POST", "/api/sessions", body),
  updateSession: (id, body) => request("PATCH", `/api/sessions/${encodeURIComponent(id)}`, body),
  deleteSession: (id) => request("DELETE", `/api/sessions/${encodeURIComponent(id)}`),
  appendMessages: (id, messages) => request("POST", `/api/sessions/${encodeURIComponent(id)}/messages`, { messages }),
  rollback: (id, amount) => request("POST", `/chat/history/${encodeURIComponent(id)}/rollback`, { amount }),
};

/**
 * The SSE fallback: POST /api/chat with stream=true and read `data:` events.
 * handlers: onToken(text), onDone(finalEvent). Resolves when the stream ends; abort `signal` to stop.
 */
export async function sseChat(body, { signal, onToken, onDone }) {
  const response = await fetch("/api/chat", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) onUnauthorized(message);
    throw new ApiError(response.status, message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  const dispatch = () => {
    if (!data.length) return;
    const text = data.join("\n");
    data = [];
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    if (event.done) onDone(event);
    else if (event.token) onToken(event.token);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") dispatch();
      else if (line.startsWith("data:")) data.push(line.startsWith("data: ") ? line.slice(6) : line.slice(5));
    }
  }
  if (buffer.startsWith("data:")) data.push(buffer.startsWith("data: ") ? buffer.slice(6) : buffer.slice(5));
  dispatch();
}
