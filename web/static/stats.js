// The live counter in the top bar: tokens, decode speed and time to first token of the last answer.
import { $ } from "./state.js";

export function setStats({ tokens, tps, ttft }) {
  $("stat-tokens").textContent = String(tokens ?? 0);
  $("stat-tps").textContent = tps == null || !Number.isFinite(tps) ? "–" : tps.toFixed(1);
  $("stat-ttft").textContent = ttft == null || !Number.isFinite(ttft) ? "–" : `${ttft < 1 ? (ttft * 1000).toFixed(0) + " ms" : ttft.toFixed(2) + " s"}`;
}

/** While streaming: what the page measures from the tokens of answer `s` so far. */
export function liveStats(s) {
  const ttft = s.firstAt ? (s.firstAt - s.sentAt) / 1000 : null;
  const span = s.lastAt && s.firstAt ? (s.lastAt - s.firstAt) / 1000 : 0;
  const tps = s.count > 1 && span > 0 ? (s.count - 1) / span : s.count === 1 && ttft ? 1 / ttft : null;
  setStats({ tokens: s.count, tps, ttft });
}

/** At the end: the server's own numbers (`usage`, `timings`) when it sent them, else what the page measured. */
export function finalStats(s, info) {
  const completion = info.usage?.completion_tokens;
  const t = info.timings || {};
  const measuredTtft = s.firstAt ? (s.firstAt - s.sentAt) / 1000 : null;
  const span = s.lastAt && s.firstAt ? (s.lastAt - s.firstAt) / 1000 : 0;
  const tokens = completion ?? s.count;
  let tps = t.decode_tokens_per_s ?? (s.count > 1 && span > 0 ? (s.count - 1) / span : null);
  if (tps == null && tokens > 0 && t.total_s) tps = tokens / t.total_s;
  if (tps == null && tokens === 1 && measuredTtft) tps = 1 / measuredTtft;
  setStats({ tokens, tps, ttft: t.ttft_s ?? measuredTtft });
}
