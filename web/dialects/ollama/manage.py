"""The Ollama dialect's model management: pull (the download's real bytes, then the conversion's steps),
create from a local GGUF file / Hugging Face folder or an installed model, copy, delete. Blob uploads are
refused (501): ortllm converts from paths and its catalog, not from pushed layers.

A pull or create runs in a background thread, one per model name: every request for that name follows the
same lines from the start, and a client that goes away leaves it running to the end (the store installs
atomically, so no half-built model is ever listed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import Field

from ortllm.catalog import load_catalog
from ortllm.errors import InvalidModelName, ModelNotFound, OrtllmError, first_line
from ortllm.store import InstalledModel, validate_name

from ...errors import OLLAMA_PREFIX, error_response
from ...routes import api_route
from ...services import ConvertRequest, Services, client_gone, services
from ...wire import Wire

manage_bp = Blueprint("ollama_manage", __name__, url_prefix=OLLAMA_PREFIX)
TAG = "Ollama"
log = logging.getLogger("ortllm.web")

NDJSON = "application/x-ndjson"
BLOBS = (
    "blob uploads are not supported by ortllm; create models from a local path with "
    '/api/create {"from": PATH}'
)
UNKNOWN = "pull model manifest: file does not exist"  # Ollama's words for a name its library lacks
# what each conversion step is called in the status lines (the fetch step speaks through its bytes)
STEP_STATUS = {"dequantise": "dequantising", "build": "building onnx model"}
# `quantize`: ortllm's precisions, and Ollama's types mapped to the nearest one ortllm builds
QUANTIZE = {
    "int4": "int4",
    "q4_k_m": "int4",
    "q4_k_s": "int4",
    "q4_0": "int4",
    "q4_1": "int4",
    "int8": "int8",
    "q8_0": "int8",
    "fp16": "fp16",
    "f16": "fp16",
    "bf16": "bf16",
    "fp32": "fp32",
    "f32": "fp32",
}
# /api/create fields ortllm cannot honour: refused by name rather than dropped
UNSUPPORTED_CREATE = ("adapters", "template", "system", "parameters", "license", "messages", "modelfile")
BYTES_EVERY_S = 0.1  # at most this often a download line (the last one always goes)


class PullRequest(Wire):
    model: str | None = None
    name: str | None = None  # the older field
    insecure: bool = False  # accepted, no effect: ortllm pulls from its catalog's sources, not a registry
    stream: bool = True


class DeleteRequest(Wire):
    model: str | None = None
    name: str | None = None


class CopyRequest(Wire):
    source: str
    destination: str


class CreateRequest(Wire):
    model: str | None = None
    name: str | None = None
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    license: str | list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    modelfile: str | None = None
    stream: bool = True


# ---- names ----------------------------------------------------------------------------------------


def ollama_name(name: str) -> str:
    """An Ollama model reference as ortllm names it: `:latest` is every ortllm model's only tag."""
    name = name.strip()
    base, sep, tag = name.rpartition(":")
    return base if sep and tag.lower() == "latest" else name


def store_name(name: str, what: str) -> str:
    """A name to install under; 400 `<what> "name" is invalid: ...` when the store cannot hold it."""
    try:
        return validate_name(ollama_name(name))
    except InvalidModelName as exc:
        raise InvalidModelName(f'{what} "{name}" is invalid: {exc}') from None


# ---- conversions in the background ----------------------------------------------------------------


class Job:
    """One conversion's status lines, kept whole so that any number of requests can follow them."""

    def __init__(self, source: str, precision: str | None) -> None:
        self.source = source
        self.precision = precision
        self.lines: list[dict[str, Any]] = []
        self.status = 200  # an error line's HTTP status, for a request that did not stream
        self.finished = False
        self._cond = threading.Condition()

    def emit(self, line: dict[str, Any]) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def fail(self, status: int, message: str) -> None:
        self.status = status
        self.emit({"error": message})

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def follow(self, gone: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
        """Every line from the first, as they come, until the job ends (or the client has gone)."""
        seen = 0
        while True:

            def ready(n: int = seen) -> bool:
                return len(self.lines) > n or self.finished

            with self._cond:
                self._cond.wait_for(ready, timeout=1.0)
                batch, finished = self.lines[seen:], self.finished
            seen += len(batch)
            yield from batch
            if finished and not batch:
                return
            if not batch and gone is not None and gone():
                return


class JobProgress:
    """The converter's Progress (with download bytes) written as Ollama's status lines."""

    def __init__(self, job: Job, digest: str, verb: str) -> None:
        self.job = job
        self.digest = digest
        self.status = f"{verb} {digest.removeprefix('sha256:')[:12]}"
        self.bytes_seen = False
        self.fetching = False
        self._last = 0.0

    def step(self, name: str) -> None:
        self.fetching = name == "fetch"
        if name in STEP_STATUS:
            self.job.emit({"status": STEP_STATUS[name]})

    def done(self, name: str) -> None:
        self.fetching = False
        if name == "build":
            self.job.emit({"status": "writing manifest"})  # the store commits the model next

    def log(self, line: str) -> None:
        pass  # the builder's own log stays in build.log

    def downloaded(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < BYTES_EVERY_S:
            return
        self._last = now
        self.bytes_seen = True
        self.job.emit({"status": self.status, "digest": self.digest, "total": total, "completed": done})


_JOBS: dict[tuple[str, str], Job] = {}
_JOBS_LOCK = threading.Lock()


def start(svc: Services, request: ConvertRequest, name: str, first: dict[str, Any], verb: str) -> Job:
    """The running conversion of `name` (a second request for the same source follows it), else a new one."""
    key = (str(svc.store.root), name)
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is not None:
            if (job.source, job.precision) != (request.source, request.precision):
                raise InvalidModelName(
                    f'model "{name}" is being built from {job.source} by another request; '
                    "retry when it is done"
                )
            return job
        job = _JOBS[key] = Job(request.source, request.precision)
    job.emit(first)
    digest = "sha256:" + hashlib.sha256(request.source.encode()).hexdigest()  # the source's id, not a blob's
    thread = threading.Thread(
        target=_run, args=(svc, request, job, key, JobProgress(job, digest, verb)), daemon=True
    )
    thread.name = f"ortllm-convert-{name}"
    thread.start()
    return job


def _run(
    svc: Services, request: ConvertRequest, job: Job, key: tuple[str, str], progress: JobProgress
) -> None:
    try:
        model = svc.convert(request, progress)
        if not progress.bytes_seen:  # installed already: its files stand for the download
            progress.downloaded(model.size_bytes, model.size_bytes)
        job.emit({"status": "success"})
    except OrtllmError as exc:
        # a failing source (download, pip) is a bad gateway; the rest keep their own status
        status = 502 if progress.fetching and exc.status >= 500 else exc.status
        job.fail(status, str(exc))
    except Exception as exc:  # the builder's own failures: reported on the stream, never a crash
        log.exception("conversion of %s failed", request.source)
        job.fail(500, f"conversion failed: {first_line(exc)}")
    finally:
        with _JOBS_LOCK:
            if _JOBS.get(key) is job:
                del _JOBS[key]
        job.finish()


# ---- answers --------------------------------------------------------------------------------------


def respond(lines: Iterator[dict[str, Any]], stream: bool, status_of: Callable[[], int]) -> Response:
    """NDJSON lines (`stream`), or the last line alone: `{"status": "success"}` or the error (its status)."""
    if stream:
        body = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines)
        return Response(body, mimetype=NDJSON)
    last: dict[str, Any] = {}
    for last in lines:
        if "error" in last:
            return error_response(status_of(), last["error"])
    return jsonify(last)


def refused(first: dict[str, Any], status: int, message: str, stream: bool) -> Response:
    """An error found before any work: streamed after Ollama's first line, or answered with its status."""
    if stream:
        return respond(iter([first, {"error": message}]), True, lambda: status)
    return error_response(status, message)


def installed_or_none(svc: Services, name: str) -> InstalledModel | None:
    try:
        return svc.registry.installed(name)
    except ModelNotFound:
        return None


# ---- routes ---------------------------------------------------------------------------------------


@api_route(
    manage_bp,
    "/api/pull",
    ("POST",),
    tag=TAG,
    summary="Install a catalog model: NDJSON status lines with the download's bytes, then conversion steps",
    body=PullRequest,
    streams=True,
)
def pull(body: PullRequest) -> Response:
    wanted = body.model or body.name
    if not wanted:
        return error_response(400, "model is required")
    first = {"status": "pulling manifest"}
    entry = load_catalog().find(ollama_name(wanted))
    if entry is None:
        known = ", ".join(sorted(load_catalog().entries))
        message = f'{UNKNOWN}: "{wanted}" is not in ortllm\'s catalog (it has: {known})'
        return refused(first, 404, message, body.stream)
    svc = services()
    request, name = svc.conversion(entry.name)
    job = start(svc, request, name, first, "pulling")
    return respond(job.follow(client_gone()), body.stream, lambda: job.status)


@api_route(
    manage_bp,
    "/api/create",
    ("POST",),
    tag=TAG,
    summary="Create a model from a local GGUF file or Hugging Face folder (`from`) or an installed model",
    body=CreateRequest,
    streams=True,
)
def create(body: CreateRequest) -> Response:
    wanted = body.model or body.name
    if not wanted:
        return error_response(400, "model is required")
    if body.files:
        return error_response(400, BLOBS)
    for field in UNSUPPORTED_CREATE:
        if getattr(body, field) not in (None, "", [], {}):
            return error_response(
                400, f"`{field}` is not supported by ortllm's /api/create (it builds models from `from` only)"
            )
    name = store_name(wanted, "model")
    precision = None
    if body.quantize:
        precision = QUANTIZE.get(body.quantize.lower())
        if precision is None:
            return error_response(
                400,
                f'unsupported quantization type "{body.quantize}": use int4, int8, fp16, bf16 or fp32 '
                "(q4_K_M, q4_K_S, q4_0 and q4_1 mean int4, q8_0 int8, f16 fp16)",
            )
    if not body.from_:
        return error_response(400, "neither 'from' or 'files' was specified")
    svc = services()
    first = {"status": "reading model metadata"}
    source = installed_or_none(svc, ollama_name(body.from_))
    if source is not None and (
        precision is None or any(v.precision == precision for v in source.variants.values())
    ):
        svc.copy_model(source.name, name)  # the same weights under a new name
        lines = [first, {"status": f"using existing model {source.name}"}, {"status": "success"}]
        return respond(iter(lines), body.stream, lambda: 200)
    if source is None and _names_a_path(body.from_) and not svc.server_paths_allowed:
        return error_response(
            403,
            "creating a model from a path on the server is allowed only on a server without authentication; "
            "run `ortllm convert PATH` on the server instead",
        )
    # an installed model in another precision is rebuilt from its own source; anything else is a source
    origin = str(source.get("catalog_name") or source.get("source")) if source else body.from_
    request, name = svc.conversion(origin, name=name, precision=precision, force=True)
    job = start(svc, request, name, first, "reading")
    return respond(job.follow(client_gone()), body.stream, lambda: job.status)


@api_route(
    manage_bp,
    "/api/delete",
    ("DELETE",),
    tag=TAG,
    summary="Delete an installed model (unloaded first); 200 with an empty body",
    body=DeleteRequest,
)
def delete(body: DeleteRequest) -> Response:
    wanted = body.model or body.name
    if not wanted:
        return error_response(400, "model is required")
    try:
        services().delete_model(ollama_name(wanted))
    except ModelNotFound:
        return error_response(404, f"model '{wanted}' not found")
    return Response(status=200)


@api_route(
    manage_bp,
    "/api/copy",
    ("POST",),
    tag=TAG,
    summary="Install an installed model again under another name; 200 with an empty body",
    body=CopyRequest,
)
def copy(body: CopyRequest) -> Response:
    destination = store_name(body.destination, "destination")
    svc = services()
    if installed_or_none(svc, ollama_name(body.source)) is None:
        return error_response(404, f'model "{body.source}" not found')
    svc.copy_model(ollama_name(body.source), destination)
    return Response(status=200)


@api_route(
    manage_bp,
    "/api/blobs/<path:digest>",
    ("HEAD", "POST"),
    tag=TAG,
    summary="Not supported (501): create models from a local path with /api/create",
)
def blobs(digest: str) -> Response:
    return error_response(501, BLOBS)


def _names_a_path(source: str) -> bool:
    """Whether a create source is a file or folder of this machine (not a catalog name, hf: or pypi:)."""
    if source.startswith(("hf:", "pypi:")):
        return False
    return "/" in source or "\\" in source or source.startswith(("~", ".")) or Path(source).exists()
