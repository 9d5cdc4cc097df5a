"""The model store: one folder per converted model under `$ORTLLM_HOME/models`.

Layout::

    models/NAME/manifest.json        what the model is and which variants it holds
    models/NAME/cpu-int4/            one variant: genai_config.json, model.onnx, tokenizer ...

Writes are atomic: a conversion builds in a dot-folder and is renamed into place only when
complete, so a crash or Ctrl-C never leaves a model (or variant) that `list` shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidModelName, ModelNotFound
from .paths import ortllm_home

MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str) -> str:
    """A store name: letters, digits, '.', '_', '-'; no path separators, no '..'."""
    if not _NAME_RE.match(name) or ".." in name:
        raise InvalidModelName(
            f"Invalid model name '{name}': use letters, digits, '.', '_' and '-' (at most 128 characters)"
        )
    return name


def variant_id(ep: str, precision: str) -> str:
    """The folder name of one build of a model, e.g. `cpu-int4`."""
    return f"{ep}-{precision}"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass(frozen=True)
class Variant:
    """One build of a model for one execution provider and precision."""

    id: str
    path: Path
    info: dict[str, Any]

    @property
    def ep(self) -> str:
        return str(self.info.get("ep", "cpu"))

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", ""))

    @property
    def size_bytes(self) -> int:
        return int(self.info.get("size_bytes", 0))


@dataclass(frozen=True)
class InstalledModel:
    """A model in the store, as its manifest describes it."""

    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def variants(self) -> dict[str, Variant]:
        """Variants listed in the manifest whose folder is complete."""
        out = {}
        for vid, info in self.manifest.get("variants", {}).items():
            vpath = self.path / vid
            if (vpath / "genai_config.json").is_file() or (vpath / "model.onnx").is_file():
                out[vid] = Variant(vid, vpath, info)
        return out

    @property
    def size_bytes(self) -> int:
        return sum(v.size_bytes for v in self.variants.values())

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "chat"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.manifest.get(key, default)


class ModelStore:
    """Lists, finds, installs (atomically) and removes converted models."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or ortllm_home()) / "models"
        self.root.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[InstalledModel]:
        models = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            model = self._read(child)
            if model is not None and model.variants:
                models.append(model)
        return models

    def find(self, name: str) -> InstalledModel | None:
        """The installed model `name`; `NAME:latest` is NAME too (Ollama's clients name models so)."""
        if name.endswith(":latest") and len(name) > len(":latest"):
            name = name.removesuffix(":latest")
        try:
            validate_name(name)
        except InvalidModelName:
            return None
        path = self.root / name
        model = self._read(path) if path.is_dir() else None
        return model if model is not None and model.variants else None

    def get(self, name: str) -> InstalledModel:
        model = self.find(name)
        if model is None:
            installed = ", ".join(m.name for m in self.list()) or "none"
            raise ModelNotFound(f"Model '{name}' not found. Available models: {installed}")
        return model

    def remove(self, name: str, variant: str | None = None) -> None:
        """Delete a model (or one variant of it); the rename first makes it vanish atomically."""
        model = self.get(validate_name(name))
        if variant is None or set(model.variants) == {variant}:
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(model.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return
        if variant not in model.variants:
            raise ModelNotFound(
                f"Model '{name}' has no variant '{variant}' (it has: {', '.join(model.variants)})"
            )
        manifest = dict(model.manifest)
        manifest["variants"] = {k: v for k, v in manifest["variants"].items() if k != variant}
        _write_json_atomic(model.path / MANIFEST, manifest)
        shutil.rmtree(model.path / variant, ignore_errors=True)

    @contextmanager
    def install(self, name: str, variant: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield an empty folder to build one variant into; commit it only if the block succeeds.

        `manifest` holds the model-level fields; the caller fills `manifest["variants"][variant]`
        before the block ends (sizes are added here).
        """
        validate_name(name)
        self.clean_stale()
        staging = self.root / f".staging-{name}-{variant}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (staging / variant).mkdir(parents=True)
        try:
            yield staging / variant
            info = manifest.setdefault("variants", {}).setdefault(variant, {})
            info["size_bytes"] = dir_size(staging / variant)
            info.setdefault("created", _now())
            self._commit(name, variant, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, name: str, variant: str, staging: Path, manifest: dict[str, Any]) -> None:
        target = self.root / name
        existing = self._read(target) if target.is_dir() else None
        if existing is None:
            if target.exists():  # a folder without a readable manifest: an old broken install
                shutil.rmtree(target)
            manifest = {**manifest, "name": name, "created": _now()}
            _write_json_atomic(staging / MANIFEST, manifest)
            os.rename(staging, target)
            return
        # add or replace one variant beside the others
        merged = {**existing.manifest, **{k: v for k, v in manifest.items() if k != "variants"}}
        merged["variants"] = {**existing.manifest.get("variants", {}), variant: manifest["variants"][variant]}
        merged["updated"] = _now()
        old = target / f".old-{variant}-{uuid.uuid4().hex[:8]}"
        if (target / variant).exists():
            os.rename(target / variant, old)
        os.rename(staging / variant, target / variant)
        _write_json_atomic(target / MANIFEST, merged)
        shutil.rmtree(old, ignore_errors=True)

    def clean_stale(self, max_age_s: float = 0.0) -> None:
        """Remove leftovers of interrupted conversions (`kill -9`) whose owner process is gone."""
        for child in self.root.iterdir():
            if not child.name.startswith((".staging-", ".trash-")):
                continue
            try:
                changed = child.stat().st_mtime
            except OSError:  # another process removed it meanwhile
                continue
            pid = _pid_in(child.name)
            if pid is not None and _owner_alive(pid, changed):
                continue
            if time.time() - changed >= max_age_s:
                shutil.rmtree(child, ignore_errors=True)

    @staticmethod
    def _read(path: Path) -> InstalledModel | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return InstalledModel(path.name, path, manifest)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _pid_in(folder_name: str) -> int | None:
    # .staging-NAME-VARIANT-PID-RAND
    parts = folder_name.rsplit("-", 2)
    try:
        return int(parts[-2]) if len(parts) == 3 else None
    except ValueError:
        return None


def _owner_alive(pid: int, changed: float) -> bool:
    """Whether process `pid` runs and can have made a folder last changed at `changed` (a process
    started after that only reuses the dead owner's pid)."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # it exists but may not be inspected: take it for the owner
        return True
    return started <= changed + 2.0  # create_time is derived from the boot time: allow for its rounding
