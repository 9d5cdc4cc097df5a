// One chat request, whichever way it travels: the multi-turn WebSocket (/chat/ws) when it is open,
// else the SSE fallback (POST /api/chat). Both wire formats are written from the same request here,
// so the server gets the same question, session, options, stop sequences and system prompt either way.
import { sseChat } from "./api.js";

/**
 * The request for one answer.
 * model, prompt: the model's name and the new user message; sessionId: the conversation (null: the
 * server starts one); options: {temperature, top_p, top_k, max_tokens, repeat_penalty}; stop: strings;
 * system: the system prompt ("" for none: the session keeps the one it has).
 */
export function chatRequest({ model, prompt, sessionId = null, options, stop = [], system = "" }) {
  const { temperature, top_p, top_k, max_tokens, repeat_penalty } = options;
  return { model, prompt, sessionId, options: { temperature, top_p, top_k, max_tokens, repeat_penalty }, stop, system };
}

/** The WebSocket's kebab-case body (the server's RustChatRequest). */
export function webSocketBody(req) {
  const o = req.options;
  return {
    "model-name": req.model,
    prompt: req.prompt,
    ...(req.sessionId ? { "session-id": req.sessionId } : {}),
    "max-token": o.max_tokens,
    temperature: o.temperature,
    "top-p": o.top_p,
    "top-k": o.top_k,
    "repeat-penalty": o.repeat_penalty,
    ...(req.system ? { "system-prompt": req.system } : {}),
    stop: req.stop,
  };
}

/** The SSE fallback's body (the server's ChatRequest): the system prompt travels as a `system` message. */
export function sseBody(req) {
  return {
    model: req.model,
    messages: [...(req.system ? [{ role: "system", content: req.system }] : []), { role: "user", content: req.prompt }],
    ...(req.sessionId ? { session_id: req.sessionId } : {}),
    options: { ...req.options, ...(req.stop.length ? { stop: req.stop } : {}) },
  };
}

/**
 * Stream the answer to `req` over `connection`'s socket, or over SSE when none is open.
 * handlers: onSession(id) once the server names the session, onToken(text), onEnd(info) with
 * finish_reason / usage / timings, onError(message). Returns { cancel() }.
 */
export function streamChat(connection, req, { onSession, onToken, onEnd, onError }) {
  const handle = connection.send(webSocketBody(req), {
    onStart: (info) => onSession(info["session-id"]),
    onToken,
    onEnd,
    onError,
  });
  return handle || streamSse(req, { onSession, onToken, onEnd, onError });
}

function streamSse(req, { onSession, onToken, onEnd, onError }) {
  const abort = new AbortController();
  let cancelled = false;
  (async () => {
    let final = null;
    try {
      await sseChat(sseBody(req), { signal: abort.signal, onToken, onDone: (event) => (final = event) });
    } catch (err) {
      if (cancelled || err.name === "AbortError") return onEnd({ finish_reason: "cancelled" });
      return onError(err.message || "the request failed");
    }
    if (!final) return cancelled ? onEnd({ finish_reason: "cancelled" }) : onError("the stream ended early");
    if (final.error) return onError(final.error);
    onSession(final.session_id);
    onEnd({ finish_reason: final.finish_reason, usage: final.usage });
  })();
  return {
    cancel() {
      cancelled = true;
      abort.abort();
    },
  };
}
