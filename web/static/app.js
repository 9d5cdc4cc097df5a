// ortllm's browser chat: sessions from the server's store, answers streamed over the multi-turn
// WebSocket (SSE fallback), settings, regenerate, edit-and-branch, export, API key, themes.
import { api, ApiError, getApiKey, setApiKey, setUnauthorizedHandler, sseChat } from "./api.js";
import { Connection } from "./connection.js";
import { applyIcons, ICONS } from "./icons.js";
import { copyText, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback = null) {
    try {
      const raw = localStorage.getItem(`ortllm.${key}`);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(`ortllm.${key}`);
      else localStorage.setItem(`ortllm.${key}`, JSON.stringify(value));
    } catch {
      /* storage disabled */
    }
  },
};

// ---- settings --------------------------------------------------------------------------------

const NUMERIC = ["temperature", "top_p", "top_k", "max_tokens", "repeat_penalty"];
const DEFAULTS = { temperature: 0.7, top_p: 0.9, top_k: 40, max_tokens: 512, repeat_penalty: 1.1 };
const INTEGER = new Set(["top_k", "max_tokens"]);

const state = {
  models: [],
  modelsError: "",
  model: store.get("model", ""),
  sessions: [],
  current: null, // {id, title, model, system_prompt}
  messages: [], // {role, content, stored, note, error, el}
  streaming: null, // {assistant, cancel, sentAt, firstAt, lastAt, count, cancelled}
  settings: { ...DEFAULTS, ...(store.get("settings") || {}) },
  stopText: store.get("stop", ""),
  systemDefault: store.get("system", ""),
  editing: null,
};

function clampSetting(key, value) {
  const input = $(`${key}-num`);
  let v = Number(value);
  if (!Number.isFinite(v)) v = DEFAULTS[key];
  v = Math.min(Number(input.max), Math.max(Number(input.min), v));
  return INTEGER.has(key) ? Math.round(v) : v;
}

function showSettings() {
  for (const key of NUMERIC) {
    $(`${key}-num`).value = state.settings[key];
    $(`${key}-range`).value = state.settings[key];
  }
  $("stop-seqs").value = state.stopText;
  $("system-prompt").value = state.current ? state.current.system_prompt || "" : state.systemDefault;
}

function bindSettings() {
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
    const model = currentModelObject();
    state.settings = { ...DEFAULTS, ...pickNumeric(model?.parameters || {}) };
    state.stopText = "";
    store.set("settings", null);
    store.set("stop", null);
    showSettings();
  });
  $("settings-btn").addEventListener("click", () => toggleSettings());
  $("settings-close").addEventListener("click", () => toggleSettings(false));
}

function pickNumeric(params) {
  const out = {};
  for (const key of NUMERIC) if (typeof params[key] === "number") out[key] = params[key];
  return out;
}

function toggleSettings(open) {
  const panel = $("settings");
  const show = open ?? panel.hidden;
  panel.hidden = !show;
  $("settings-btn").setAttribute("aria-expanded", String(show));
  document.querySelector(".app").classList.toggle("with-settings", show);
  if (show) $("temperature-num").focus();
  else $("settings-btn").focus();
}

function stopSequences() {
  return state.stopText
    .split("\n")
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
    .filter((s) => s.trim() !== "");
}

// ---- theme -----------------------------------------------------------------------------------

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hl-dark").disabled = theme !== "dark";
  $("hl-light").disabled = theme !== "light";
  const next = theme === "dark" ? "light" : "dark";
  $("theme-btn").setAttribute("aria-label", `Switch to ${next} mode`);
  $("theme-btn").innerHTML = theme === "dark" ? ICONS.sun : ICONS.moon;
}

function bindTheme() {
  applyTheme(document.documentElement.dataset.theme || "dark");
  $("theme-btn").addEventListener("click", () => {
    const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    try {
      localStorage.setItem("ortllm.theme", theme);
    } catch {
      /* storage disabled */
    }
    applyTheme(theme);
  });
}

// ---- banner, API key -------------------------------------------------------------------------

function showBanner(text, kind = "error", action = null) {
  const banner = $("banner");
  banner.replaceChildren();
  banner.dataset.kind = kind;
  const span = document.createElement("span");
  span.textContent = text;
  banner.append(span);
  if (action) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "btn small";
    button.textContent = action.label;
    button.addEventListener("click", action.run);
    banner.append(button);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "icon-btn";
  close.setAttribute("aria-label", "Dismiss message");
  close.innerHTML = ICONS.close;
  close.addEventListener("click", hideBanner);
  banner.append(close);
  banner.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

let keyPromptShown = false;
function openKeyDialog(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent =
    reason || "If the server requires an API key, enter it here. It is kept in this browser only.";
  $("key-input").value = getApiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function bindKeyDialog() {
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
    refreshAll();
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

// ---- connection ------------------------------------------------------------------------------

const CONN_TEXT = { connecting: "connecting…", connected: "connected", reconnecting: "reconnecting…", offline: "offline" };

const connection = new Connection({
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
    if (status === "connected" && wasOffline) refreshAll();
    wasOffline = status === "offline" || status === "reconnecting";
  },
});
let wasOffline = false;

// ---- models ----------------------------------------------------------------------------------

function currentModelObject() {
  return state.models.find((m) => m.name === state.model);
}

async function loadModels() {
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

function renderModels() {
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

// ---- sessions --------------------------------------------------------------------------------

async function loadSessions() {
  try {
    const { sessions } = await api.sessions();
    state.sessions = (sessions || []).slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) showBanner(`Could not list conversations: ${err.message}`);
    return;
  }
  renderSessions();
}

function sessionTitle(s) {
  return (s && (s.title || "").trim()) || "Untitled chat";
}

function renderSessions() {
  const list = $("session-list");
  list.replaceChildren();
  $("session-empty").hidden = state.sessions.length > 0;
  for (const s of state.sessions) {
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
    meta.textContent = `${count} message${count === 1 ? "" : "s"}${s.model ? ` · ${s.model}` : ""}`;
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

async function openSession(id, { quiet = false } = {}) {
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
    .map((m) => ({ role: m.role, content: m.content, stored: true }));
  if (session.model && state.models.some((m) => m.name === session.model)) {
    state.model = session.model;
    store.set("model", state.model);
    renderModels();
  }
  store.set("session", session.id);
  hideBanner();
  showSettings();
  renderConversation();
  renderSessions();
  closeSidebar();
}

function newChat() {
  if (state.streaming) return;
  state.current = null;
  state.messages = [];
  store.set("session", null);
  showSettings();
  renderConversation();
  renderSessions();
  closeSidebar();
  $("composer-input").focus();
}

function titleFrom(text) {
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

// ---- conversation view -----------------------------------------------------------------------

function renderConversation() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.messages.length) box.append(welcome);
  for (const msg of state.messages) box.append(messageElement(msg));
  $("convo-title").textContent = state.current ? sessionTitle(state.current) : "New chat";
  renderBranchNote();
  updateControls();
  scrollToEnd(true);
}

function renderBranchNote() {
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

function messageElement(msg) {
  const el = document.createElement("article");
  el.className = `msg ${msg.role}`;
  el.setAttribute("aria-label", msg.role === "user" ? "You" : "Assistant");
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.setAttribute("aria-hidden", "true");
  avatar.textContent = msg.role === "user" ? "You" : "AI";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const content = document.createElement("div");
  content.className = msg.role === "user" ? "content plain" : "content md";
  const meta = document.createElement("div");
  meta.className = "msg-note";
  const actions = document.createElement("div");
  actions.className = "msg-actions";
  bubble.append(content, meta, actions);
  el.append(avatar, bubble);
  msg.el = el;
  fillMessage(msg);
  return el;
}

function fillMessage(msg, { final = true } = {}) {
  const el = msg.el;
  if (!el) return;
  const content = el.querySelector(".content");
  if (msg.role === "user") content.textContent = msg.content;
  else renderMarkdown(content, msg.content, { final });
  el.classList.toggle("streaming", !final);
  el.classList.toggle("error", !!msg.error);
  const note = el.querySelector(".msg-note");
  note.textContent = msg.error ? `Error: ${msg.error}` : msg.note || "";
  note.hidden = !note.textContent;
  if (final) fillActions(msg);
}

function fillActions(msg) {
  const actions = msg.el.querySelector(".msg-actions");
  actions.replaceChildren();
  const index = state.messages.indexOf(msg);
  if (msg.role === "user") {
    actions.append(textButton("Edit", "Edit this message and branch the conversation", () => startEdit(msg), "edit-btn"));
  } else {
    if (msg.content) {
      actions.append(
        textButton("Copy", "Copy this answer", async (e) => {
          const ok = await copyText(msg.content);
          e.target.textContent = ok ? "Copied" : "Copy failed";
          setTimeout(() => (e.target.textContent = "Copy"), 1500);
        }, "copy-answer-btn"),
      );
    }
    if (index === state.messages.length - 1) {
      actions.append(textButton("Regenerate", "Regenerate the last answer", regenerate, "regen-btn"));
    }
  }
}

function textButton(text, label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `btn small ghost ${cls || ""}`;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function refreshActions() {
  for (const msg of state.messages) if (msg.el && msg !== state.streaming?.assistant) fillActions(msg);
  updateControls();
}

let welcome;
let scheduled = false;
function scheduleRender(msg) {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    if (state.streaming?.assistant === msg) {
      fillMessage(msg, { final: false });
      scrollToEnd();
    }
  });
}

function scrollToEnd(force = false) {
  const box = $("messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
  if (force || near) box.scrollTop = box.scrollHeight;
}

function updateControls() {
  const busy = !!state.streaming;
  $("send-btn").hidden = busy;
  $("stop-btn").hidden = !busy;
  $("send-btn").disabled = !state.model;
  $("messages").setAttribute("aria-busy", String(busy));
  for (const b of document.querySelectorAll(".msg-actions .edit-btn, .msg-actions .regen-btn")) b.disabled = busy;
  for (const b of document.querySelectorAll("#new-chat, .session-open, .session-delete, #model-select")) b.disabled = busy;
  if (!state.models.length) $("model-select").disabled = true;
}

// ---- stats -----------------------------------------------------------------------------------

function setStats({ tokens, tps, ttft }) {
  $("stat-tokens").textContent = String(tokens ?? 0);
  $("stat-tps").textContent = tps == null || !Number.isFinite(tps) ? "–" : tps.toFixed(1);
  $("stat-ttft").textContent = ttft == null || !Number.isFinite(ttft) ? "–" : `${ttft < 1 ? (ttft * 1000).toFixed(0) + " ms" : ttft.toFixed(2) + " s"}`;
}

function liveStats(s) {
  const ttft = s.firstAt ? (s.firstAt - s.sentAt) / 1000 : null;
  const span = s.lastAt && s.firstAt ? (s.lastAt - s.firstAt) / 1000 : 0;
  const tps = s.count > 1 && span > 0 ? (s.count - 1) / span : s.count === 1 && ttft ? 1 / ttft : null;
  setStats({ tokens: s.count, tps, ttft });
}

// ---- chatting --------------------------------------------------------------------------------

async function ensureSession(text) {
  if (state.current) return;
  const body = { title: titleFrom(text), model: state.model };
  const system = $("system-prompt").value.trim();
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

async function send(text) {
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
  const onToken = (token) => {
    if (state.streaming !== s) return;
    const now = performance.now();
    if (!s.firstAt) s.firstAt = now;
    s.lastAt = now;
    s.count++;
    assistant.content += token;
    liveStats(s);
    scheduleRender(assistant);
  };
  const system = $("system-prompt").value.trim();
  const opts = state.settings;
  const stop = stopSequences();
  const handle = connection.send(
    {
      "model-name": state.model,
      prompt: text,
      ...(state.current ? { "session-id": state.current.id } : {}),
      "max-token": opts.max_tokens,
      temperature: opts.temperature,
      "top-p": opts.top_p,
      "top-k": opts.top_k,
      "repeat-penalty": opts.repeat_penalty,
      ...(system ? { "system-prompt": system } : {}),
      stop,
    },
    {
      onStart: (info) => adoptSession(info["session-id"]),
      onToken,
      onEnd: (info) => finishAnswer(s, info),
      onError: (message) => finishAnswer(s, { error: message }),
    },
  );
  if (handle) {
    s.cancel = () => handle.cancel();
    return;
  }
  // SSE fallback
  const abort = new AbortController();
  s.cancel = () => {
    s.cancelled = true;
    abort.abort();
  };
  let final = null;
  try {
    await sseChat(
      {
        model: state.model,
        messages: [{ role: "user", content: text }],
        ...(state.current ? { session_id: state.current.id } : {}),
        options: {
          temperature: opts.temperature,
          top_p: opts.top_p,
          top_k: opts.top_k,
          max_tokens: opts.max_tokens,
          repeat_penalty: opts.repeat_penalty,
          ...(stop.length ? { stop } : {}),
        },
      },
      { signal: abort.signal, onToken, onDone: (event) => (final = event) },
    );
  } catch (err) {
    if (s.cancelled || err.name === "AbortError") return finishAnswer(s, { finish_reason: "cancelled" });
    return finishAnswer(s, { error: err.message || "the request failed" });
  }
  if (!final) return finishAnswer(s, s.cancelled ? { finish_reason: "cancelled" } : { error: "the stream ended early" });
  if (final.error) return finishAnswer(s, { error: final.error });
  adoptSession(final.session_id);
  finishAnswer(s, { finish_reason: final.finish_reason, usage: final.usage });
}

function adoptSession(id) {
  if (!id || state.current) return;
  state.current = { id, title: null, model: state.model, system_prompt: $("system-prompt").value };
  store.set("session", id);
}

function finishAnswer(s, info) {
  if (state.streaming !== s) return;
  state.streaming = null;
  const { assistant, user } = s;
  const reason = info.finish_reason;
  if (info.error) {
    assistant.error = info.error;
  } else if (reason === "cancelled") {
    assistant.note = "Stopped.";
  } else if (reason === "length") {
    assistant.note = "Stopped at the max tokens limit.";
  }
  const stored = !info.error && reason !== "cancelled" && assistant.content !== "";
  user.stored = assistant.stored = stored;
  // the server's own numbers when it sent them, else what the page measured
  const completion = info.usage?.completion_tokens;
  const t = info.timings || {};
  const measuredTtft = s.firstAt ? (s.firstAt - s.sentAt) / 1000 : null;
  const span = s.lastAt && s.firstAt ? (s.lastAt - s.firstAt) / 1000 : 0;
  const tokens = completion ?? s.count;
  let tps = t.decode_tokens_per_s ?? (s.count > 1 && span > 0 ? (s.count - 1) / span : null);
  if (tps == null && tokens > 0 && t.total_s) tps = tokens / t.total_s;
  if (tps == null && tokens === 1 && measuredTtft) tps = 1 / measuredTtft;
  setStats({ tokens, tps, ttft: t.ttft_s ?? measuredTtft });
  fillMessage(assistant, { final: true });
  refreshActions();
  scrollToEnd();
  if (info.error) showBanner(`The answer failed: ${info.error}`);
  loadSessions().then(renderBranchNote);
  loadModels();
  if (document.activeElement === document.body || document.activeElement === $("stop-btn")) $("composer-input").focus();
}

function stop() {
  const s = state.streaming;
  if (!s || s.cancelled) return;
  s.cancelled = true;
  if (s.cancel) s.cancel();
  else finishAnswer(s, { finish_reason: "cancelled" });
}

/** Regenerate: drop the last exchange (from the server too) and ask the same question again. */
async function regenerate() {
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
function startEdit(msg) {
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
    await branchFrom(index, text);
  }
}

async function branchFrom(index, text) {
  if (state.streaming) return;
  const history = state.messages
    .slice(0, index)
    .filter((m) => m.stored)
    .map((m) => ({ role: m.role, content: m.content }));
  const parent = state.current;
  const body = { title: branchTitle(parent ? sessionTitle(parent) : titleFrom(text)), model: state.model, messages: history };
  const system = $("system-prompt").value.trim();
  if (system) body.system_prompt = system;
  let session;
  try {
    session = await api.createSession(body);
  } catch (err) {
    showBanner(`Could not branch the conversation: ${err.message}`);
    return;
  }
  if (parent) {
    const branches = store.get("branches", {});
    branches[session.id] = parent.id;
    store.set("branches", branches);
  }
  state.current = { id: session.id, title: session.title ?? body.title, model: session.model, system_prompt: session.system_prompt };
  state.messages = history.map((m) => ({ ...m, stored: true }));
  state.sessions.unshift({ ...session, title: state.current.title, message_count: history.length });
  store.set("session", session.id);
  renderConversation();
  renderSessions();
  await send(text);
}

// ---- export ----------------------------------------------------------------------------------

function conversationData() {
  const c = state.current || {};
  return {
    id: c.id || null,
    title: state.current ? sessionTitle(c) : "New chat",
    model: c.model || state.model || null,
    system_prompt: c.system_prompt || $("system-prompt").value || null,
    exported: new Date().toISOString(),
    messages: state.messages.filter((m) => m.content).map((m) => ({ role: m.role, content: m.content })),
  };
}

function exportConversation(format) {
  const data = conversationData();
  let blob;
  if (format === "json") {
    blob = new Blob([JSON.stringify(data, null, 2) + "\n"], { type: "application/json" });
  } else {
    const lines = [`# ${data.title}`, "", `- model: ${data.model || "?"}`, `- exported: ${data.exported}`];
    if (data.id) lines.push(`- session: ${data.id}`);
    if (data.system_prompt) lines.push("", "## System", "", data.system_prompt);
    for (const m of data.messages) lines.push("", m.role === "user" ? "## User" : "## Assistant", "", m.content);
    blob = new Blob([lines.join("\n") + "\n"], { type: "text/markdown" });
  }
  const slug = data.title.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "chat";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `ortllm-${slug}.${format === "json" ? "json" : "md"}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

// ---- layout, keyboard ------------------------------------------------------------------------

function closeSidebar() {
  document.querySelector(".app").classList.remove("sidebar-open");
  $("sidebar-toggle").setAttribute("aria-expanded", "false");
}

function bindLayout() {
  $("sidebar-toggle").addEventListener("click", () => {
    const open = document.querySelector(".app").classList.toggle("sidebar-open");
    $("sidebar-toggle").setAttribute("aria-expanded", String(open));
  });
  $("new-chat").addEventListener("click", newChat);
  $("export-md").addEventListener("click", () => exportConversation("md"));
  $("export-json").addEventListener("click", () => exportConversation("json"));
  $("model-select").addEventListener("change", () => {
    state.model = $("model-select").value;
    store.set("model", state.model);
    renderModels();
    updateControls();
  });
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

async function refreshAll() {
  await loadModels();
  await loadSessions();
  updateControls();
}

async function init() {
  welcome = $("welcome");
  applyIcons();
  bindTheme();
  bindSettings();
  bindKeyDialog();
  bindLayout();
  showSettings();
  renderConversation();
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
