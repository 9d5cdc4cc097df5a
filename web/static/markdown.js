// Markdown → safe HTML: marked parses, raw HTML is shown as text, DOMPurify sanitises the result,
// highlight.js colours code blocks, and every block gets a copy button.
import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import hljs from "./vendor/highlight/highlight.min.js";

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // model output and pasted text are data: HTML in them is displayed, never interpreted
    html({ text }) {
      return escapeHtml(text);
    },
    // no remote images (tracking pixels, requests to arbitrary hosts): a link instead
    image({ href, text }) {
      const label = escapeHtml(text || href || "image");
      return `<a href="${escapeHtml(href || "")}">[image: ${label}]</a>`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style", "srcset"],
  ALLOW_DATA_ATTR: false,
};

const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;

/** `text` without a code fence opened at its end with nothing in it (a lone trailing ```): no empty block. */
export function dropEmptyTrailingFence(text) {
  const lines = text.split("\n");
  let open = -1;
  let fence = "";
  lines.forEach((line, i) => {
    const m = FENCE.exec(line);
    if (!m) return;
    if (open < 0) {
      if (m[1][0] === "`" && m[2].includes("`")) return; // inline code, not a fence (CommonMark)
      open = i;
      fence = m[1];
    } else if (m[1][0] === fence[0] && m[1].length >= fence.length && !m[2].trim()) {
      open = -1;
    }
  });
  if (open < 0 || lines.slice(open + 1).some((l) => l.trim())) return text;
  return lines.slice(0, open).join("\n");
}

/** Sanitised HTML for a markdown text. */
export function toSafeHtml(text) {
  let html;
  try {
    html = marked.parse(dropEmptyTrailingFence(text || ""));
  } catch {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY);
}

/** Render markdown into `el`; `final` adds highlighting and copy buttons (skipped while streaming). */
export function renderMarkdown(el, text, { final = true } = {}) {
  el.innerHTML = toSafeHtml(text);
  for (const pre of el.querySelectorAll("pre")) decorateCode(pre, final);
}

function decorateCode(pre, highlight) {
  const code = pre.querySelector("code");
  if (!code) return;
  const lang = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9) || "";
  if (highlight) {
    if (lang && !hljs.getLanguage(lang)) code.classList.remove(`language-${lang}`);
    try {
      hljs.highlightElement(code);
    } catch {
      /* leave the block plain */
    }
  }
  const wrap = document.createElement("div");
  wrap.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = lang || "code";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-btn";
  button.textContent = "Copy";
  button.setAttribute("aria-label", `Copy ${lang || "code"} block`);
  button.addEventListener("click", async () => {
    const ok = await copyText(code.textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  head.append(label, button);
  pre.replaceWith(wrap);
  wrap.append(head, pre);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // older browsers or a non-secure origin: the selection fallback
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}
