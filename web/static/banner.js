// The message bar above the composer: errors, the offline notice, an optional action button.
import { ICONS } from "./icons.js";
import { $ } from "./state.js";

export function showBanner(text, kind = "error", action = null) {
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

export function hideBanner() {
  $("banner").hidden = true;
}
