"""The orchestrator dialect: `/models`, start/stop, `/generate`.

A "container" is a loaded model in this process: start loads it, stop unloads it, and `port` is this
server's own. Errors are `{"detail": ...}`."""

from __future__ import annotations

import threading

from flask import Blueprint, Response, jsonify

from ortllm.errors import GenerationTimeout, ModelNotFound

from ...routes import api_route
from ...services import services
from ...streaming import cancelled, complete
from . import protocol as p

bp = Blueprint("orchestrator", __name__)
TAG = "orchestrator"


def model_card(name: str) -> p.TGIModel:
    """The orchestrator's model object, with `context_length` and `quantization`."""
    svc = services()
    m = svc.model_object(svc.registry.installed(name))
    return p.TGIModel(
        id=m["name"],
        name=m["name"],
        hf_name=m["hf_name"],
        running=m["loaded"],
        context_length=m["context_size"],
        quantization=m["quantization"],
    )


def container_name(name: str) -> str:
    return f"ortllm-{name}"


@api_route(
    bp, "/models", tag=TAG, summary="Installed models and whether each is running", response=p.TGIModelList
)
def list_models() -> Response:
    models = p.TGIModelList(models=[model_card(m.name) for m in services().installed()])
    return jsonify(models.model_dump(mode="json"))


@api_route(bp, "/models/<path:model_id>", tag=TAG, summary="One model's details", response=p.TGIModel)
def get_model(model_id: str) -> Response:
    return jsonify(model_card(model_id).model_dump(mode="json"))


@api_route(
    bp,
    "/models/<path:model_id>/start",
    ("POST",),
    tag=TAG,
    summary="Load a model (start its 'container')",
    response=p.TGIStarted,
)
def start(model_id: str) -> Response:
    svc = services()
    name = svc.registry.installed(model_id).name
    already_running = svc.registry.is_loaded(name)
    svc.registry.load(name)
    started = p.TGIStarted(
        message=f"Container for {model_id} started",
        port=svc.settings.server.port,
        container_name=container_name(name),
        already_running=already_running,
    )
    return jsonify(started.model_dump(mode="json"))


@api_route(
    bp,
    "/models/<path:model_id>/stop",
    ("POST",),
    tag=TAG,
    summary="Unload a model (404 when not running)",
    response=p.TGIStopped,
)
def stop(model_id: str) -> Response:
    registry = services().registry
    if not registry.unload(registry.installed(model_id).name):
        raise ModelNotFound(f"Container for {model_id} is not running")
    return jsonify(p.TGIStopped(message=f"Container for {model_id} stopped").model_dump(mode="json"))


@api_route(
    bp,
    "/generate",
    ("POST",),
    tag=TAG,
    summary="Generate text (loads the model; 504 after the timeout)",
    body=p.TGIGenerateRequest,
    response=p.TGIGenerateResponse,
)
def generate(body: p.TGIGenerateRequest) -> Response:
    svc = services()
    options = {"max_tokens": body.max_new_tokens, "temperature": body.temperature, "top_p": body.top_p}
    _, stream = svc.complete(body.model_id, body.prompt, options, template=False)
    timeout = svc.settings.server.generate_timeout
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stream.cancel()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        result = stream.result()
    finally:
        timer.cancel()
    if expired.is_set() and cancelled(result):
        raise GenerationTimeout(f"Generation did not finish within {timeout:g} seconds")
    complete(result)  # shutdown or unload: partial text must not look like an answer
    reply = p.TGIGenerateResponse(generated_text=result.text, model_id=body.model_id)
    return jsonify(reply.model_dump(mode="json"))
