// Asking and answering: send a message, stream the answer, stop it, regenerate the last one, and
// edit an earlier message (which branches the conversation).
import { api } from "./api.js";
import { hideBanner, showBanner } from "./banner.js";
import {
  fillMessage,
  messageElement,
  refreshActions,
  scheduleRender,
  scrollToEnd,
  textButton,
  updateControls,
} from "./messages.js";
import { loadModels } from "./models.js";
import { adoptSession, branchSession, ensureSession, loadSessions, renderBranchNote, STOPPED } from "./sessions.js";
import { stopSequences, systemPrompt } from "./settings.js";
import { $, state } from "./state.js";
import { finalStats, liveStats, setStats } from "./stats.js";
import { connection } from "./status.js";
import { chatRequest, streamChat } from "./transport.js";

/** The request for `text` from what the page holds now: model, conversation, settings. */
function requestFor(text) {
  return chatRequest({
    model: state.model,
    prompt: text,
    sessionId: state.current?.id ?? null,
    options: state.settings,
    stop: stopSequences(),
    system: systemPrompt(),
  });
}

export async function send(text) {
  text = text.trim();
  if (!text || state.streaming) return;
  if (!state.model) {
    showBanner("No model to chat with: install one with `ortllm pull`.");
    return;
  }
  hideBanner();
  const user = { role: "user", content: text, stored: false };
  const assistant = { role: "assistant", content: "", stored: false };
  const s = { assistant, user, cancel: null, sentAt: performance.now(), firstAt: 0, lastAt: 0, count: 0, cancelled: false };
  state.streaming = s;
  if (!state.messages.length) $("messages").replaceChildren();
  state.messages.push(user, assistant);
  $("messages").append(messageElement(user), messageElement(assistant));
  fillMessage(assistant, { final: false });
  updateControls();
  scrollToEnd(true);
  setStats({ tokens: 0 });
  try {
    await ensureSession(text);
  } catch (err) {
    return finishAnswer(s, { error: err.message });
  }
  s.sentAt = performance.now();
  const handle = streamChat(connection, requestFor(text), {
    onSession: adoptSession,
    onToken(token) {
      if (state.streaming !== s) return;
      const now = performance.now();
      if (!s.firstAt) s.firstAt = now;
      s.lastAt = now;
      s.count++;
      assistant.content += token;
      liveStats(s);
      scheduleRender(assistant);
    },
    onEnd: (info) => finishAnswer(s, info),
    onError: (message) => finishAnswer(s, { error: message }),
  });
  s.cancel = () => handle.cancel();
}

function finishAnswer(s, info) {
  if (state.streaming !== s) return;
  state.streaming = null;
  const { assistant, user } = s;
  const reason = info.finish_reason;
  if (info.error) {
    assistant.error = info.error;
  } else if (reason === "cancelled") {
    assistant.note = STOPPED;
    assistant.stopped = true;
  } else if (reason === "length") {
    assistant.note = "Stopped at the max tokens limit.";
  }
  const stored = !info.error && reason !== "cancelled" && assistant.content !== "";
  user.stored = assistant.stored = stored;
  finalStats(s, info);
  fillMessage(assistant, { final: true });
  refreshActions();
  scrollToEnd();
  if (info.error) showBanner(`The answer failed: ${info.error}`);
  const saved = reason === "cancelled" && !info.error ? saveStopped(s) : Promise.resolve();
  saved.then(loadSessions).then(renderBranchNote);
  loadModels();
  if (document.activeElement === document.body || document.activeElement === $("stop-btn")) $("composer-input").focus();
}

/** Keep a stopped turn (the question and the partial answer, marked stopped): the server drops it. */
async function saveStopped({ user, assistant }) {
  const id = state.current?.id;
  if (!id) return;
  try {
    await api.appendMessages(id, [
      { role: "user", content: user.content },
      { role: "assistant", content: assistant.content, stopped: true },
    ]);
    user.stored = assistant.stored = true;
  } catch (err) {
    showBanner(`Could not keep the stopped answer: ${err.message}`);
  }
}

export function stop() {
  const s = state.streaming;
  if (!s || s.cancelled) return;
  s.cancelled = true;
  if (s.cancel) s.cancel();
  else finishAnswer(s, { finish_reason: "cancelled" });
}

/** Regenerate: drop the last exchange (from the server too) and ask the same question again. */
export async function regenerate() {
  if (state.streaming) return;
  let u = state.messages.length - 1;
  while (u >= 0 && state.messages[u].role !== "user") u--;
  if (u < 0) return;
  const text = state.messages[u].content;
  if (state.current) {
    const keep = state.messages.slice(0, u).filter((m) => m.stored).length;
    try {
      const session = await api.session(state.current.id);
      const serverCount = (session.messages || []).filter((m) => m.role !== "system").length;
      if (serverCount > keep) await api.rollback(state.current.id, serverCount - keep);
    } catch (err) {
      showBanner(`Could not regenerate: ${err.message}`);
      return;
    }
  }
  for (const m of state.messages.slice(u)) m.el?.remove();
  state.messages = state.messages.slice(0, u);
  await send(text);
}

/** Edit an earlier user message: a new session holds the history before it, then the edited text is sent. */
export function startEdit(msg) {
  if (state.streaming || state.editing) return;
  const content = msg.el.querySelector(".content");
  const actions = msg.el.querySelector(".msg-actions");
  const form = document.createElement("div");
  form.className = "edit-form";
  const area = document.createElement("textarea");
  area.value = msg.content;
  area.rows = Math.min(10, Math.max(2, msg.content.split("\n").length));
  area.setAttribute("aria-label", "Edited message");
  area.className = "edit-input";
  const save = textButton("Save & branch", "Save the edit as a new branch of this conversation", () => commit(), "branch-btn");
  save.classList.remove("ghost");
  save.classList.add("primary");
  const cancel = textButton("Cancel", "Cancel editing", () => close(), "");
  const row = document.createElement("div");
  row.className = "edit-actions";
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = "Sends the edit in a new conversation branch; this one is kept.";
  row.append(hint, cancel, save);
  form.append(area, row);
  content.hidden = true;
  actions.hidden = true;
  msg.el.querySelector(".bubble").append(form);
  state.editing = msg;
  area.focus();
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      commit();
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      close();
    }
  });
  function close() {
    form.remove();
    content.hidden = false;
    actions.hidden = false;
    state.editing = null;
  }
  async function commit() {
    const text = area.value.trim();
    if (!text) return;
    const index = state.messages.indexOf(msg);
    close();
    if (state.streaming) return;
    if (await branchSession(index, text)) await send(text);
  }
}

/** The message box: Enter sends, Shift+Enter is a new line; nothing is lost while offline. */
export function bindComposer() {
  const input = $("composer-input");
  const grow = () => {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
  };
  input.addEventListener("input", grow);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.streaming) return;
    const text = input.value;
    if (!text.trim()) return;
    if (connection.state === "offline") {
      showBanner("The server is offline; reconnecting automatically. Your message was kept: send it again when connected.", "offline");
      return;
    }
    input.value = "";
    grow();
    send(text);
  });
  $("stop-btn").addEventListener("click", stop);
  // the long placeholder is cut on a phone: a short one there
  const narrow = matchMedia("(max-width: 600px)");
  const full = input.placeholder;
  const fit = () => (input.placeholder = narrow.matches ? "Send a message…" : full);
  narrow.addEventListener("change", fit);
  fit();
}
