// Download the open conversation as Markdown or JSON (built in the page, nothing is uploaded).
import { sessionTitle } from "./sessions.js";
import { $, state } from "./state.js";

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

export function bindExport() {
  $("export-md").addEventListener("click", () => exportConversation("md"));
  $("export-json").addEventListener("click", () => exportConversation("json"));
}
