// The conversation view: one element per message (Markdown for answers), its action buttons, the
// streaming re-render, scrolling, and which controls a running answer disables.
import { copyText, renderMarkdown } from "./markdown.js";
import { $, state } from "./state.js";

/** What the message buttons do (set by app.js): edit(msg) and regenerate(). */
const actions = { edit: () => {}, regenerate: () => {} };
export function setMessageActions(handlers) {
  Object.assign(actions, handlers);
}

let welcome = null; // the empty conversation's greeting, kept to show again
let scheduled = false;

/** Show `state.messages` (the greeting when there are none). */
export function renderMessages() {
  const box = $("messages");
  welcome ??= $("welcome");
  box.replaceChildren();
  if (!state.messages.length) box.append(welcome);
  for (const msg of state.messages) box.append(messageElement(msg));
  updateControls();
  scrollToEnd(true);
}

export function messageElement(msg) {
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
  const buttons = document.createElement("div");
  buttons.className = "msg-actions";
  bubble.append(content, meta, buttons);
  el.append(avatar, bubble);
  msg.el = el;
  fillMessage(msg);
  return el;
}

export function fillMessage(msg, { final = true } = {}) {
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
  const box = msg.el.querySelector(".msg-actions");
  box.replaceChildren();
  const index = state.messages.indexOf(msg);
  if (msg.role === "user") {
    box.append(textButton("Edit", "Edit this message and branch the conversation", () => actions.edit(msg), "edit-btn"));
  } else {
    if (msg.content) {
      box.append(
        textButton("Copy", "Copy this answer", async (e) => {
          const ok = await copyText(msg.content);
          e.target.textContent = ok ? "Copied" : "Copy failed";
          setTimeout(() => (e.target.textContent = "Copy"), 1500);
        }, "copy-answer-btn"),
      );
    }
    if (index === state.messages.length - 1) {
      box.append(textButton("Regenerate", "Regenerate the last answer", () => actions.regenerate(), "regen-btn"));
    }
  }
}

export function textButton(text, label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `btn small ghost ${cls || ""}`;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

/** After an answer: every message's buttons again (only the last answer offers Regenerate). */
export function refreshActions() {
  for (const msg of state.messages) if (msg.el && msg !== state.streaming?.assistant) fillActions(msg);
  updateControls();
}

/** Re-render the streaming answer at most once a frame. */
export function scheduleRender(msg) {
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

/** Follow the end of the conversation unless the reader scrolled up (or `force`). */
export function scrollToEnd(force = false) {
  const box = $("messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
  if (force || near) box.scrollTop = box.scrollHeight;
}

/** Send or Stop, and the controls a running answer disables. */
export function updateControls() {
  const busy = !!state.streaming;
  $("send-btn").hidden = busy;
  $("stop-btn").hidden = !busy;
  $("send-btn").disabled = !state.model;
  $("messages").setAttribute("aria-busy", String(busy));
  for (const b of document.querySelectorAll(".msg-actions .edit-btn, .msg-actions .regen-btn")) b.disabled = busy;
  for (const b of document.querySelectorAll("#new-chat, .session-open, .session-delete, #model-select")) b.disabled = busy;
  if (!state.models.length) $("model-select").disabled = true;
}
