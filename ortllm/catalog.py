"""The catalog of known models (`models.toml`): names, aliases, sources and defaults."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ModelNotFound

BACKENDS = ("genai", "optimum")
KINDS = ("chat", "embedding")


@dataclass(frozen=True)
class CatalogEntry:
    """One known model: where its weights come from and how to run it."""

    name: str
    source: str
    family: str
    template: str
    context_size: int
    backend: str
    kind: str
    description: str = ""
    hf_name: str = ""
    aliases: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False


def catalog_path() -> Path:
    """The packaged `models.toml` (wheel) or the repository's own (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "catalog_data" / "models.toml", here.parent / "models.toml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("models.toml is missing from the installation")


class Catalog:
    """Name and alias lookup over the catalog entries."""

    def __init__(self, entries: list[CatalogEntry], default: str) -> None:
        self.entries = {e.name: e for e in entries}
        self.default = default
        self._aliases: dict[str, str] = {}
        for e in entries:
            for key in (e.name, *e.aliases):
                self._aliases[key.lower()] = e.name

    @classmethod
    def from_toml(cls, path: Path) -> Catalog:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        entries = []
        for name, raw in data.get("models", {}).items():
            raw = dict(raw)
            raw["aliases"] = tuple(raw.get("aliases", ()))
            entry = CatalogEntry(name=name, **raw)
            if entry.backend not in BACKENDS or entry.kind not in KINDS:
                raise ValueError(f"models.toml: {name} has backend {entry.backend!r} / kind {entry.kind!r}")
            entries.append(entry)
        return cls(entries, data.get("default", entries[0].name if entries else ""))

    def find(self, name: str) -> CatalogEntry | None:
        """The entry whose name or alias is `name` (case-insensitive), or None."""
        canonical = self._aliases.get(name.lower())
        return self.entries[canonical] if canonical else None

    def get(self, name: str) -> CatalogEntry:
        entry = self.find(name)
        if entry is None:
            raise ModelNotFound(
                f"Unknown model '{name}': not in the catalog. Known models: {', '.join(sorted(self.entries))}"
            )
        return entry

    def canonical(self, name: str) -> str:
        """The catalog name for an alias; the name itself when it is not in the catalog."""
        entry = self.find(name)
        return entry.name if entry else name

    def __iter__(self):
        return iter(self.entries.values())


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The installed catalog, parsed once per process."""
    return Catalog.from_toml(catalog_path())
