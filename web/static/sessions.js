// Conversations are server sessions: the sidebar list, open, new, rename, delete, and branching
// (a new session holding the history before an edited message, linked to the one it came from).
// The sidebar lists the sessions made here (origin "ui"); API clients' sessions only on request.
import { api, ApiError } from "./api.js";
import { hideBanner, showBanner } from "./banner.js";
import { ICONS } from "./icons.js";
import { renderMessages } from "./messages.js";
import { selectModel } from "./models.js";
import { showSettings, systemPrompt } from "./settings.js";
import { $, state, store } from "./state.js";

export const STOPPED = "Stopped.";

export function sessionTitle(s) {
  return (s && (s.title || "").trim()) || "Untitled chat";
}

/** A new conversation's title: the first line of its first message. */
export function titleFrom(text) {
  const line = text.trim().split("\n")[0].trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

function branchTitle(title) {
  const base = (title || "Chat").replace(/ \(branch \d+\)$/, "");
  let n = 1;
  const taken = new Set(state.sessions.map((s) => s.title));
  while (taken.has(`${base} (branch ${n})`)) n++;
  return `${base} (branch ${n})`;
}

// ---- the sidebar -----------------------------------------------------------------------------

export async function loadSessions() {
  try {
    const { sessions } = await api.sessions();
    state.sessions = (sessions || []).slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) showBanner(`Could not list conversations: ${err.message}`);
    return;
  }
  renderSessions();
}

/** Whether the sidebar lists session `s`: made here, the open one, or (when asked) an API client's with messages. */
function listed(s) {
  if (s.origin !== "api" || state.current?.id === s.id) return true;
  return store.get("showApi", false) && (s.message_count ?? 0) > 0;
}

export function renderSessions() {
  const list = $("session-list");
  list.replaceChildren();
  const shown = state.sessions.filter(listed);
  $("session-empty").hidden = shown.length > 0;
  for (const s of shown) {
    const li = document.createElement("li");
    li.className = "session-item";
    li.dataset.id = s.id;
    const active = state.current && state.current.id === s.id;
    if (active) li.classList.add("active");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "session-open";
    if (active) open.setAttribute("aria-current", "true");
    const title = document.createElement("span");
    title.className = "session-title";
    title.textContent = sessionTitle(s);
    const meta = document.createElement("span");
    meta.className = "session-meta";
    const count = s.message_count ?? 0;
    meta.textContent = `${count} message${count === 1 ? "" : "s"}${s.model ? ` · ${s.model}` : ""}${s.origin === "api" ? " · API" : ""}`;
    open.append(title, meta);
    open.addEventListener("click", () => openSession(s.id));
    const rename = iconButton("pencil", `Rename conversation ${sessionTitle(s)}`, () => startRename(li, s));
    rename.classList.add("session-rename");
    const del = iconButton("trash", `Delete conversation ${sessionTitle(s)}`, () => confirmDelete(s));
    del.classList.add("session-delete");
    li.append(open, rename, del);
    list.append(li);
  }
}

function iconButton(icon, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "icon-btn";
  b.innerHTML = ICONS[icon];
  b.setAttribute("aria-label", label);
  b.title = label;
  b.addEventListener("click", onClick);
  return b;
}

function startRename(li, s) {
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.value = sessionTitle(s);
  input.setAttribute("aria-label", "New conversation title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== s.title) {
      try {
        await api.updateSession(s.id, { title });
        s.title = title;
        if (state.current?.id === s.id) {
          state.current.title = title;
          $("convo-title").textContent = title;
        }
      } catch (err) {
        showBanner(`Could not rename: ${err.message}`);
      }
    }
    renderSessions();
    li.isConnected || document.querySelector(`.session-item[data-id="${CSS.escape(s.id)}"] .session-open`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(s) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = `“${sessionTitle(s)}” and its messages will be deleted from the server.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await api.deleteSession(s.id);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) {
        showBanner(`Could not delete: ${err.message}`);
        return;
      }
    }
    state.sessions = state.sessions.filter((x) => x.id !== s.id);
    if (state.current?.id === s.id) newChat();
    renderSessions();
  };
  dialog.showModal();
}

export function closeSidebar() {
  document.querySelector(".app").classList.remove("sidebar-open");
  $("sidebar-toggle").setAttribute("aria-expanded", "false");
}

export function bindSidebar() {
  $("sidebar-toggle").addEventListener("click", () => {
    const open = document.querySelector(".app").classList.toggle("sidebar-open");
    $("sidebar-toggle").setAttribute("aria-expanded", String(open));
  });
  $("new-chat").addEventListener("click", newChat);
  const showApi = $("show-api");
  showApi.checked = store.get("showApi", false);
  showApi.addEventListener("change", () => {
    store.set("showApi", showApi.checked);
    renderSessions();
  });
}

// ---- the open conversation -------------------------------------------------------------------

/** Show the open conversation: its messages, title and where it branched from. */
export function showConversation() {
  renderMessages();
  $("convo-title").textContent = state.current ? sessionTitle(state.current) : "New chat";
  renderBranchNote();
}

export function renderBranchNote() {
  const note = $("branch-note");
  const parents = store.get("branches", {});
  const parentId = state.current && parents[state.current.id];
  const parent = parentId && state.sessions.find((s) => s.id === parentId);
  note.replaceChildren();
  if (!parent) {
    note.hidden = true;
    return;
  }
  note.append("branched from ");
  const link = document.createElement("button");
  link.type = "button";
  link.className = "link-btn";
  link.textContent = sessionTitle(parent);
  link.addEventListener("click", () => openSession(parent.id));
  note.append(link);
  note.hidden = false;
}

export async function openSession(id, { quiet = false } = {}) {
  if (state.streaming) return;
  let session;
  try {
    session = await api.session(id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      if (store.get("session") === id) store.set("session", null);
      if (!quiet) showBanner("That conversation no longer exists.");
      await loadSessions();
      return;
    }
    if (!quiet) showBanner(`Could not open the conversation: ${err.message}`);
    return;
  }
  state.current = { id: session.id, title: session.title, model: session.model, system_prompt: session.system_prompt };
  state.messages = (session.messages || [])
    .filter((m) => m.role === "user" || m.role === "assistant")
    .map((m) => ({ role: m.role, content: m.content, stored: true, ...(m.stopped ? { stopped: true, note: STOPPED } : {}) }));
  selectModel(session.model);
  store.set("session", session.id);
  hideBanner();
  showSettings();
  showConversation();
  renderSessions();
  closeSidebar();
}

export function newChat() {
  if (state.streaming) return;
  state.current = null;
  state.messages = [];
  store.set("session", null);
  showSettings();
  showConversation();
  renderSessions();
  closeSidebar();
  $("composer-input").focus();
}

/** Before the first question of a new chat: create its session (titled after `text`) on the server. */
export async function ensureSession(text) {
  if (state.current) return;
  const body = { title: titleFrom(text), model: state.model, origin: "ui" };
  const system = systemPrompt();
  if (system) body.system_prompt = system;
  try {
    const s = await api.createSession(body);
    state.current = { id: s.id, title: s.title ?? body.title, model: s.model, system_prompt: s.system_prompt ?? system };
    store.set("session", s.id);
    state.sessions.unshift({ ...s, message_count: s.message_count ?? 0 });
    renderSessions();
    $("convo-title").textContent = sessionTitle(state.current);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405)) return; // the server creates it
    throw err;
  }
}

/** The session the server created for an answer sent without one. */
export function adoptSession(id) {
  if (!id || state.current) return;
  state.current = { id, title: null, model: state.model, system_prompt: $("system-prompt").value };
  store.set("session", id);
}

/**
 * Open a new session holding the stored history before message `index`, linked to the open one;
 * `text` (the edited message) names it when there is none. False when the server refused.
 */
export async function branchSession(index, text) {
  const history = state.messages
    .slice(0, index)
    .filter((m) => m.stored)
    .map((m) => ({ role: m.role, content: m.content, ...(m.stopped ? { stopped: true } : {}) }));
  const parent = state.current;
  const title = branchTitle(parent ? sessionTitle(parent) : titleFrom(text));
  const body = { title, model: state.model, messages: history, origin: "ui" };
  const system = systemPrompt();
  if (system) body.system_prompt = system;
  let session;
  try {
    session = await api.createSession(body);
  } catch (err) {
    showBanner(`Could not branch the conversation: ${err.message}`);
    return false;
  }
  if (parent) {
    const branches = store.get("branches", {});
    branches[session.id] = parent.id;
    store.set("branches", branches);
  }
  state.current = { id: session.id, title: session.title ?? body.title, model: session.model, system_prompt: session.system_prompt };
  state.messages = history.map((m) => ({ ...m, stored: true, ...(m.stopped ? { note: STOPPED } : {}) }));
  state.sessions.unshift({ ...session, title: state.current.title, message_count: history.length });
  store.set("session", session.id);
  showConversation();
  renderSessions();
  return true;
}
