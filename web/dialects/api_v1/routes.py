"""The API design spec dialect under /api/v1: generate (with `latency`), a `{token, finished}` stream, models,
load, and batch generation run as one batch. Errors are `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from ortllm.catalog import load_catalog
from ortllm.errors import GenerationFailed, InvalidOptions, OrtllmError, RequestCancelled
from ortllm.store import InstalledModel

from ...routes import api_route
from ...services import EP_PREFERENCE, Stream, available_eps, services, variant_ep
from ...streaming import cancel_reason, cancelled, complete, failed, sse_response, usage_of
from . import protocol as p

bp = Blueprint("api_v1", __name__, url_prefix="/api/v1")
TAG = "/api/v1"
PRECISIONS = {
    "q4_0": "int4",
    "q4_1": "int4",
    "q4_k": "int4",
    "q4_k_m": "int4",
    "int4": "int4",
    "q8_0": "int8",
    "int8": "int8",
    "fp16": "fp16",
    "f16": "fp16",
    "bf16": "bf16",
    "fp32": "fp32",
    "f32": "fp32",
}


class ModelNotLoaded(OrtllmError):
    """No model was named and none is loaded (nor the catalog default installed)."""

    status = 503
    code = "MODEL_NOT_LOADED"
    hint = "Please call the load endpoint first (POST /api/v1/models/{name}/load), or name a model in `model`"


def model_or_default(name: str | None) -> str:
    """The named model; absent or "default": the first loaded model, else the catalog default if installed."""
    if name and name != "default":
        return name
    svc = services()
    loaded = list(svc.registry.loaded())
    if loaded:
        return loaded[0]
    default = load_catalog().default
    if svc.registry.store.find(default) is None:
        raise ModelNotLoaded(
            "No model is loaded: name one in `model` or load one with POST /api/v1/models/{name}/load"
        )
    return default


def start(body: p.SpecGenerateRequest) -> Stream:
    options = {
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "stop": body.stop,
    }
    _, stream = services().complete(model_or_default(body.model), body.prompt, options, template=True)
    return stream


def result(stream: Stream, started: float) -> p.SpecGenerateResponse:
    whole = complete(stream.result())  # cut short: a part is not an answer
    return p.SpecGenerateResponse(
        text=whole.text, usage=p.Usage(**usage_of(whole)), latency=round(time.monotonic() - started, 3)
    )


def human_size(size_mb: float) -> str:
    return f"{size_mb / 1000:.1f}GB" if size_mb >= 1000 else f"{size_mb:.0f}MB"


def spec_model(model: InstalledModel) -> p.SpecModel:
    m = services().model_object(model)
    return p.SpecModel(
        name=m["name"],
        format="onnx",
        size=human_size(m["size_mb"]),
        loaded=m["loaded"],
        memory_usage=human_size(m["size_mb"] if m["loaded"] else 0),
        quantization=m["quantization"],
    )


@api_route(
    bp,
    "/generate",
    ("POST",),
    tag=TAG,
    summary="Generate text (chat template applied)",
    body=p.SpecGenerateRequest,
    response=p.SpecGenerateResponse,
    streams=True,
)
def generate(body: p.SpecGenerateRequest) -> Response:
    if body.stream:
        return token_stream(start(body))
    started = time.monotonic()
    return jsonify(result(start(body), started).model_dump(mode="json"))


@api_route(
    bp,
    "/generate/stream",
    ("POST",),
    tag=TAG,
    summary="SSE of {token, finished}; the last has finished: true",
    body=p.SpecGenerateRequest,
    streams=True,
)
def generate_stream(body: p.SpecGenerateRequest) -> Response:
    return token_stream(start(body))


def token_stream(stream: Stream) -> Response:
    """SSE of `{token, finished}`; each token goes out when the next arrives, so the last carries finished."""

    def events() -> Iterator[dict[str, Any]]:
        held = ""
        for event in stream:
            if event.text:
                if held:
                    yield {"token": held, "finished": False}
                held = event.text
            if event.done:
                last: dict[str, Any] = {
                    "token": held,
                    "finished": True,
                    "finish_reason": event.finish_reason,
                }
                if failed(event):
                    last["error"] = {
                        "code": "GENERATION_FAILED",
                        "message": event.error,
                        "details": GenerationFailed.hint,
                    }
                else:
                    last["usage"] = usage_of(event)
                if cancelled(event):  # cut short: `finished` alone would look complete
                    last["error"] = {
                        "code": RequestCancelled.code,
                        "details": RequestCancelled.hint,
                        "message": f"The answer was cancelled: {cancel_reason()}",
                    }
                yield last

    return sse_response(events())


@api_route(
    bp, "/models", tag=TAG, summary="Installed models: format, size, loaded, memory", response=p.SpecModelList
)
def list_models() -> Response:
    models = p.SpecModelList(models=[spec_model(m) for m in services().installed()])
    return jsonify(models.model_dump(mode="json"))


@api_route(
    bp,
    "/models/<path:model_name>/load",
    ("POST",),
    tag=TAG,
    summary="Load a model (quantization, prefer_gpu)",
    body=p.SpecLoadRequest,
    response=p.SpecLoaded,
    optional_body=True,
)
def load_model(body: p.SpecLoadRequest, model_name: str) -> Response:
    svc = services()
    model = svc.registry.installed(model_name)
    variants = list(model.variants.values())
    if body.quantization:
        precision = PRECISIONS.get(body.quantization.lower(), body.quantization.lower())
        variants = [v for v in variants if v.precision == precision]
        if not variants:
            have = ", ".join(sorted({v.precision for v in model.variants.values()}))
            raise InvalidOptions(f"Model '{model.name}' has no {body.quantization} build (it has: {have})")
    eps = [ep for ep in EP_PREFERENCE if ep in available_eps() and ep in {variant_ep(v) for v in variants}]
    if not eps:
        raise InvalidOptions(
            f"No build of '{model.name}' can run here (available: {', '.join(available_eps())})"
        )
    gpus = [ep for ep in eps if ep != "cpu"]
    ep = gpus[0] if body.prefer_gpu and gpus else ("cpu" if "cpu" in eps else eps[0])
    svc.registry.load(model.name, ep=ep)
    return jsonify(p.SpecLoaded(**spec_model(model).model_dump(), device=ep).model_dump(mode="json"))


@api_route(
    bp,
    "/batch/generate",
    ("POST",),
    tag=TAG,
    summary="Several generations run together, results in order",
    body=p.SpecBatchRequest,
    response=p.SpecBatchResponse,
)
def batch_generate(body: p.SpecBatchRequest) -> Response:
    started = time.monotonic()
    streams: list[Stream] = []
    try:
        for i, item in enumerate(body.requests):  # submit all first: the scheduler batches them
            try:
                streams.append(start(item))
            except OrtllmError as exc:
                exc.args = (f"requests[{i}]: {exc}",)
                raise
        batch = p.SpecBatchResponse(results=[result(s, started) for s in streams])
        return jsonify(batch.model_dump(mode="json"))
    finally:  # an earlier one failed: the rest are closed unread, freeing their slots
        for s in streams:
            s.close()
