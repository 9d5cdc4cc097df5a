// The light/dark toggle in the top bar (theme.js picks the first theme before the page paints).
import { ICONS } from "./icons.js";
import { $ } from "./state.js";

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hl-dark").disabled = theme !== "dark";
  $("hl-light").disabled = theme !== "light";
  const next = theme === "dark" ? "light" : "dark";
  $("theme-btn").setAttribute("aria-label", `Switch to ${next} mode`);
  $("theme-btn").innerHTML = theme === "dark" ? ICONS.sun : ICONS.moon;
}

export function bindTheme() {
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
