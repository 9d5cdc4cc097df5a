"""Stop strings over streamed text: never emit a partial match, cut at the first full one."""

from __future__ import annotations


class StopMatcher:
    """Feed decoded text deltas; get back what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text (Anthropic's stop_sequence)

    def feed(self, delta: str) -> str:
        """Text safe to emit now; after a stop string, the rest is dropped and `stopped` is set."""
        if self.stopped:
            return ""
        if not self.stops:
            return delta
        text = self.pending + delta
        found = [(i, n) for n, i in enumerate(text.find(s) for s in self.stops) if i >= 0]
        if found:
            cut, first = min(found)
            self.matched = self.stops[first]
            self.stopped = True
            self.pending = ""
            return text[:cut]
        hold = self._held_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation: whatever was held back (it never completed a stop string)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
