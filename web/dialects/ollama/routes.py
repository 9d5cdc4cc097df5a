"""The Ollama dialect's inference and model-facts routes: `/`, `/api/version`, `/api/tags`, `/api/show`,
`/api/ps`, `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings` (Ollama's API, field by field).

Choices where ortllm differs from Ollama (documented in the README): `num_ctx` above the model's context is
clamped to it (as Ollama does), below it bounds the request (a longer prompt is a 400: ortllm never truncates);
an absent `num_predict` is the model's own `max_tokens` parameter when its manifest sets one, else Ollama's -1
(up to the context, at most server.max_tokens_limit); `template` overrides and `context` arrays are refused;
`think: false` drops the reasoning a model writes (templates are not told to skip it); chat is stateless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify
from llguidance import LLMatcher

from ortllm import __version__
from ortllm.errors import InvalidOptions, ModelNotFound
from ortllm.store import InstalledModel

from ...errors import OLLAMA_PREFIX
from ...routes import api_route
from ...services import Services, Stream, TokenEvent, ToolDelta, model_card, services
from ...streaming import cancel_reason, cancelled, complete, failed, logprob_items
from . import protocol as p

bp = Blueprint("ollama", __name__, url_prefix=OLLAMA_PREFIX)
TAG = "Ollama"
log = logging.getLogger("ortllm.web.ollama")

VERSION = "0.12.0"  # the Ollama API version reported: clients (VS Code Copilot) require >= 0.6.4
NDJSON = "application/x-ndjson"
FOREVER = timedelta(days=365 * 292)  # Ollama's "never expires" (a Go time.Duration's largest span)

# Ollama's options that map to ortllm's, by kind; every other known or unknown name is ignored (logged)
INT_OPTIONS = {"num_predict", "top_k", "repeat_last_n", "seed", "num_ctx"}
FLOAT_OPTIONS = {"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
RENAMED = {"num_predict": "max_tokens"}
# ortllm's parameter names as a Modelfile's PARAMETER lines write them (/api/show `parameters`)
MODELFILE_NAMES = {"max_tokens": "num_predict"}
THINK_LEVELS = ("high", "medium", "low")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# ---- names, facts, times ---------------------------------------------------------------------


def now_rfc3339() -> str:
    """RFC 3339 UTC with a fraction, as Ollama's `created_at`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def not_found(name: str) -> ModelNotFound:
    return ModelNotFound(f"model {json.dumps(name)} not found, try pulling it first")


def resolve(name: str | None) -> InstalledModel:
    """The installed model an Ollama name means: `x` and `x:latest` are the same; another tag only when a
    model is named so."""
    if not name:
        raise InvalidOptions("model is required", param="model")
    registry = services().registry
    candidates = [name, name.removesuffix(":latest")] if name.endswith(":latest") else [name]
    for candidate in candidates:
        try:
            return registry.installed(candidate)
        except ModelNotFound:
            continue
    raise not_found(name)


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def digest(model: InstalledModel) -> str:
    """A stable sha256 of the model's manifest (it names every variant and how it was built)."""
    try:
        data = (model.path / "manifest.json").read_bytes()
    except OSError:
        data = json.dumps(model.manifest, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def human_count(count: int) -> str:
    """Ollama's parameter_size, e.g. 135.04M, 7.6B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


def capabilities(model: InstalledModel) -> list[str]:
    """Ollama's capabilities of a model, from its kind, chat template and tokenizer."""
    if model.kind == "embedding":
        return ["embedding"]
    card = model_card(model)
    caps = ["completion"]
    if template_knows_tools(card.chat_template):
        caps.append("tools")
    if card.fim is not None:
        caps.append("insert")
    if card.chat_template and "<think>" in card.chat_template:
        caps.append("thinking")
    return caps


def template_knows_tools(template: str | None) -> bool:
    from ortllm.toolcalls import template_knows_tools as knows

    return knows(template)


def details(model: InstalledModel) -> dict[str, Any]:
    card = model_card(model)
    family = str(model.get("family") or card.architecture)
    variant = next(iter(model.variants.values()))
    return {
        "parent_model": "",
        "format": "onnx",
        "family": family,
        "families": [family],
        "parameter_size": human_count(card.parameter_count) if card.parameter_count else "",
        "quantization_level": variant.precision.upper(),
    }


def modified_at(model: InstalledModel) -> str:
    return rfc3339(datetime.fromtimestamp(model.path.stat().st_mtime, timezone.utc))


def parameters_text(model: InstalledModel) -> str:
    """The model's default parameters as a Modelfile's PARAMETER lines write them (`name value`)."""
    lines = []
    for name, value in (model.get("parameters") or {}).items():
        values = value if isinstance(value, list) else [value]
        lines += [f"{MODELFILE_NAMES.get(name, name):<15} {json.dumps(v)}" for v in values]
    return "\n".join(lines)


# ---- keep_alive ------------------------------------------------------------------------------


def parse_keep_alive(value: p.KeepAlive | None) -> float | None:
    """Seconds to keep a model loaded (a Go duration string or a number of seconds); -1.0 for forever
    (a negative value); None when not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidOptions(
            "keep_alive must be a duration string or a number of seconds", param="keep_alive"
        )
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == "0":
            seconds = 0.0
        elif body and re.fullmatch(f"(?:{_DURATION.pattern})+", body):
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(body))
        else:
            raise InvalidOptions(
                f'keep_alive: invalid duration "{value}" (e.g. "5m", "1h30m", "0", or a number of seconds)',
                param="keep_alive",
            )
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise InvalidOptions("keep_alive must be finite", param="keep_alive")
    return -1.0 if seconds < 0 else seconds


class KeepAlive:
    """Per-model unload deadlines set by `keep_alive` (one per app): a timer unloads a model whose deadline
    passed and that has nothing queued or running (it retries each second while busy)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.deadlines: dict[str, float | None] = {}  # monotonic deadline; None: kept loaded
        self.timers: dict[str, threading.Timer] = {}
        self.lock = threading.Lock()

    def set(self, name: str, seconds: float) -> None:
        with self.lock:
            old = self.timers.pop(name, None)
            if old is not None:
                old.cancel()
            if seconds < 0:
                self.deadlines[name] = None
                return
            deadline = time.monotonic() + seconds
            self.deadlines[name] = deadline
            self._arm(name, deadline, seconds)

    def _arm(self, name: str, deadline: float, delay: float) -> None:
        timer = threading.Timer(max(delay, 0.0), self._expire, args=(name, deadline))
        timer.daemon = True
        self.timers[name] = timer
        timer.start()

    def _expire(self, name: str, deadline: float) -> None:
        with self.lock:
            if self.deadlines.get(name) != deadline:
                return  # a later request set another deadline
            runner = self.svc.registry.loaded().get(name)
            if runner is not None and (runner.active_count or runner.queue_depth):
                self._arm(name, deadline, 1.0)
                return
            self.deadlines.pop(name, None)
            self.timers.pop(name, None)
        if runner is not None:
            log.info("keep_alive expired: unloading %s", name)
            self.svc.registry.unload(name)

    def expires_at(self, name: str) -> datetime:
        """When /api/ps says `name` unloads: its keep_alive deadline, else the server's idle timeout."""
        now = datetime.now(timezone.utc)
        if name in self.deadlines:
            deadline = self.deadlines[name]
            if deadline is None:
                return now + FOREVER
            return now + timedelta(seconds=max(0.0, deadline - time.monotonic()))
        idle = self.svc.settings.server.keep_alive
        return now + (timedelta(seconds=idle) if idle > 0 else FOREVER)


def keep_alive() -> KeepAlive:
    state = current_app.extensions.get("ortllm_ollama_keep_alive")
    if state is None:
        state = current_app.extensions.setdefault("ortllm_ollama_keep_alive", KeepAlive(services()))
    return state  # type: ignore[no-any-return]


def load(name: str) -> tuple[Any, int]:
    """The model's runner and the nanoseconds spent loading it for this request (0 when it was loaded)."""
    svc = services()
    was_loaded = svc.registry.is_loaded(name)
    start = time.monotonic_ns()
    runner = svc.scheduler(name)
    return runner, 0 if was_loaded else max(1, time.monotonic_ns() - start)


def after(name: str, seconds: float | None) -> None:
    """Apply a request's keep_alive once its answer is complete."""
    if seconds is not None:
        keep_alive().set(name, seconds)


# ---- options, format, messages ---------------------------------------------------------------


def runtime_options(
    raw: dict[str, Any] | None, card_context: int, defaults: dict[str, Any]
) -> dict[str, Any]:
    """Ollama's `options` as the runtime's options (400 for a wrong type naming the option)."""
    raw = raw or {}
    out: dict[str, Any] = {}
    ignored = []
    for key, value in raw.items():
        if value is None:
            continue
        if key in INT_OPTIONS:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not float(value).is_integer()
            ):
                raise InvalidOptions(f'option "{key}" must be of type integer', param=f"options.{key}")
            out[key] = int(value)
        elif key in FLOAT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidOptions(f'option "{key}" must be of type float', param=f"options.{key}")
            out[key] = float(value)
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise InvalidOptions('option "stop" must be of type array of strings', param="options.stop")
            out["stop"] = value
        else:
            ignored.append(key)
    if ignored:
        log.debug("ignoring Ollama options ortllm has no use for: %s", ", ".join(ignored))
    context = card_context
    if "num_ctx" in out:
        num_ctx = out.pop("num_ctx")
        if num_ctx < 1:
            raise InvalidOptions('option "num_ctx" must be a positive integer', param="options.num_ctx")
        if num_ctx > card_context:
            log.debug("num_ctx %d above the model's context %d: clamped", num_ctx, card_context)
        context = min(num_ctx, card_context)
        out["num_ctx"] = context  # the request's window: a longer prompt is a 400 (Ollama would cut it)
    limit = min(context, services().settings.server.max_tokens_limit)
    if "num_predict" in out:
        n = out.pop("num_predict")
        if n in (-1, -2):
            out["max_tokens"] = limit
        elif n < 1:
            raise InvalidOptions(
                'option "num_predict" must be -1, -2 or a positive number of tokens',
                param="options.num_predict",
            )
        else:
            out["max_tokens"] = n
    elif "max_tokens" not in defaults:
        out["max_tokens"] = limit  # Ollama's default num_predict is -1
    if "seed" in out and out["seed"] < 0:
        out.pop("seed")  # Ollama's -1: a random seed
    return out


def guidance_of(fmt: p.Format | None) -> tuple[str, str] | None:
    """`format` as a grammar for the runtime's constrained decoding: "json" or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return ("json_schema", json.dumps({"type": "object"}))
    if not isinstance(fmt, dict):
        raise InvalidOptions(
            f'invalid format {json.dumps(fmt)}: send "json" or a JSON schema', param="format"
        )
    text = json.dumps(fmt)
    problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(text))
    if problem:
        raise InvalidOptions(f"format: the JSON schema cannot be used: {problem.strip()}", param="format")
    return ("json_schema", text)


def check_think(name: str, model: InstalledModel, think: p.Think | None) -> bool | None:
    """The request's `think` as True/False/None (unset); 400 for a model that cannot think."""
    if isinstance(think, str):
        if think not in THINK_LEVELS:
            raise InvalidOptions(
                f"think must be true, false or one of {', '.join(THINK_LEVELS)}", param="think"
            )
        think = True
    if think and "thinking" not in capabilities(model):
        raise InvalidOptions(f"{json.dumps(name)} does not support thinking", param="think")
    return think


def no_images(name: str, images: list[str] | None) -> None:
    if images:
        raise InvalidOptions(f"{json.dumps(name)} does not support images", param="images")


ROLES = ("system", "user", "assistant", "tool")


def openai_messages(name: str, messages: list[p.Message]) -> list[dict[str, Any]]:
    """Ollama's messages in OpenAI's shape (what Services.tool_plan reads): call arguments as JSON text, each
    call an id (Ollama's own, or made up), each tool result the id of the call it answers (by tool_call_id,
    else tool_name, else the oldest unanswered call)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for i, m in enumerate(messages):
        no_images(name, m.images)
        if m.role not in ROLES:
            raise InvalidOptions(
                f"messages[{i}].role must be one of {', '.join(ROLES)} (got {m.role!r})",
                param=f"messages[{i}].role",
            )
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                cid = call.id or f"call_{i}_{j}"
                function = {"name": call.function.name, "arguments": json.dumps(call.function.arguments)}
                calls.append({"id": cid, "type": "function", "function": function})
                open_calls.append((cid, call.function.name))
            out.append({"role": "assistant", "content": m.content, "tool_calls": calls})
        elif m.role == "tool":
            match = [c for c in open_calls if c[0] == m.tool_call_id] or [
                c for c in open_calls if c[1] == m.tool_name
            ]
            candidates = match or open_calls
            if not candidates:
                raise InvalidOptions(
                    f"messages[{i}] is a tool result, but no earlier assistant message has a tool call it answers",
                    param=f"messages[{i}]",
                )
            found = candidates[0]
            open_calls.remove(found)
            out.append({"role": "tool", "content": m.content, "tool_call_id": found[0]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def tool_calls(calls: Iterable[Any], start: int = 0) -> list[dict[str, Any]]:
    """Parsed calls in Ollama's shape: arguments an object."""
    out = []
    for index, call in enumerate(calls, start=start):
        try:
            arguments = json.loads(call.arguments) if call.arguments else {}
        except ValueError:
            arguments = {}
        function = {"index": index, "name": call.name, "arguments": arguments}
        out.append({"id": call.id, "function": function})
    return out


# ---- answers ---------------------------------------------------------------------------------


def metrics(final: TokenEvent | Any, started_ns: int, load_ns: int) -> dict[str, Any]:
    """The done line's counts and nanosecond durations, from the runtime's usage and timings."""
    usage, timings = final.usage, final.timings
    out: dict[str, Any] = {
        "total_duration": time.monotonic_ns() - started_ns,
        "load_duration": load_ns,
        "prompt_eval_count": usage.prompt_tokens if usage else 0,
        "prompt_eval_duration": 0,
        "eval_count": usage.completion_tokens if usage else 0,
        "eval_duration": 0,
    }
    if timings is not None:
        out["prompt_eval_duration"] = max(0, int((timings.ttft_s - timings.queued_s) * 1e9))
        out["eval_duration"] = max(0, int((timings.total_s - timings.ttft_s) * 1e9))
    return out


def done_reason(final: Any) -> str:
    return "length" if final.finish_reason == "length" else "stop"


def ndjson(lines: Iterator[dict[str, Any]]) -> Response:
    """Stream `lines` as JSON lines; the generator is closed when the client goes (its stream closes then)."""

    def body() -> Iterator[str]:
        try:
            for line in lines:
                yield json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        finally:
            close = getattr(lines, "close", None)
            if close:
                close()

    return Response(body(), mimetype=NDJSON, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def early_end(event: TokenEvent) -> dict[str, Any] | None:
    """The error line that ends a failed or cancelled stream (Ollama's streams end so), else None."""
    if failed(event):
        return {"error": event.error or "generation failed"}
    if cancelled(event):
        return {"error": f"The answer was cancelled: {cancel_reason()}"}
    return None


def run_answer(
    stream: Stream,
    parse: Callable[[str, bool], list[ToolDelta]],
    parser: Any,
    line: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    streaming: bool,
    think: bool | None,
    started_ns: int,
    load_ns: int,
    on_end: Callable[[], None],
    with_logprobs: bool,
) -> Response:
    """An answer as Ollama's lines (or one object): `parse(text, final)` turns generated text into deltas,
    `line(fields)` makes a line of this route's shape from content/thinking/tool_calls fields."""

    def fields(pieces: list[ToolDelta]) -> dict[str, Any]:
        content = "".join(d.text for d in pieces if d.kind == "content")
        thinking = "".join(d.text for d in pieces if d.kind == "reasoning") if think is not False else ""
        out: dict[str, Any] = {"content": content}
        if thinking:
            out["thinking"] = thinking
        return out

    if not streaming:
        try:
            result = complete(stream.result())
            pieces = parse(result.text, True)
        finally:
            stream.close()
            on_end()
        answer = fields(pieces)
        calls = tool_calls(parser.calls) if parser is not None else []
        if calls:
            answer["tool_calls"] = calls
        out = {**line(answer), "done": True, "done_reason": done_reason(result)}
        if with_logprobs and result.logprobs is not None:
            out["logprobs"] = logprob_items(result.logprobs)
        return jsonify({**out, **metrics(result, started_ns, load_ns)})

    def lines() -> Iterator[dict[str, Any]]:
        sent_calls = 0
        try:
            for event in stream:
                pieces = parse(event.text, False) if event.text else []
                if event.done:
                    if (error := early_end(event)) is not None:
                        yield error
                        return
                    pieces += parse("", True)
                answer = fields(pieces)
                calls = parser.calls if parser is not None else []
                if len(calls) > sent_calls:
                    answer["tool_calls"] = tool_calls(calls[sent_calls:], sent_calls)
                    sent_calls = len(calls)
                text = answer["content"] or answer.get("thinking") or answer.get("tool_calls")
                logprobs = logprob_items(event.logprobs) if with_logprobs and event.logprobs else None
                if text or logprobs:
                    out = {**line(answer), "done": False}
                    if logprobs:
                        out["logprobs"] = logprobs
                    yield out
                if event.done:
                    done = {**line({"content": ""}), "done": True, "done_reason": done_reason(event)}
                    yield {**done, **metrics(event, started_ns, load_ns)}
        finally:
            stream.close()
            on_end()

    return ndjson(lines())


def parser_fn(parser: Any) -> Callable[[str, bool], list[ToolDelta]]:
    """`parse(text, final)` over an OutputParser (None: the text is all content)."""

    def parse(text: str, final: bool) -> list[ToolDelta]:
        if parser is None:
            return [ToolDelta("content", text)] if text else []
        pieces = parser.feed(text) if text else []
        return pieces + (parser.finish() if final else [])

    return parse


def load_answer(requested: str, name: str, seconds: float | None, empty: dict[str, Any]) -> Response:
    """An empty chat/generate: load the model (done_reason "load"), or unload it with keep_alive 0."""
    if seconds == 0:
        was_loaded = services().registry.unload(name)
        keep_alive().deadlines.pop(name, None)
        log.info("keep_alive 0: %s %s", name, "unloaded" if was_loaded else "was not loaded")
        return jsonify(
            {"model": requested, "created_at": now_rfc3339(), **empty, "done": True, "done_reason": "unload"}
        )
    load(name)
    after(name, seconds)
    return jsonify(
        {"model": requested, "created_at": now_rfc3339(), **empty, "done": True, "done_reason": "load"}
    )


# ---- routes ----------------------------------------------------------------------------------


@bp.get("/")
def root() -> Response:
    """Ollama's liveness answer (HEAD too)."""
    return Response("Ollama is running", mimetype="text/plain")


@api_route(bp, "/api/version", tag=TAG, summary="The Ollama API version (and ortllm's)")
def version() -> Response:
    return jsonify({"version": VERSION, "ortllm": __version__})


@api_route(bp, "/api/tags", tag=TAG, summary="Installed models (Ollama)")
def tags() -> Response:
    models = []
    for m in services().installed():
        variant = next(iter(m.variants.values()))
        models.append(
            {
                "name": tagged(m.name),
                "model": tagged(m.name),
                "modified_at": modified_at(m),
                "size": variant.size_bytes,
                "digest": digest(m),
                "details": details(m),
            }
        )
    return jsonify({"models": models})


@api_route(bp, "/api/show", ("POST",), tag=TAG, summary="One model's facts (Ollama)", body=p.ShowRequest)
def show(body: p.ShowRequest) -> Response:
    requested = body.model or body.name
    model = resolve(requested)
    card = model_card(model)
    arch = card.architecture
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": model.name,
        "general.parameter_count": card.parameter_count,
        f"{arch}.context_length": card.context_length,
        f"{arch}.embedding_length": card.embedding_length,
    }
    out: dict[str, Any] = {
        "modelfile": f"# ortllm model {model.name} (ONNX; no Modelfile)\nFROM {model.path}\n",
        "parameters": parameters_text(model),
        "template": card.chat_template or "",
        "details": details(model),
        "model_info": info,
        "capabilities": capabilities(model),
        "modified_at": modified_at(model),
    }
    if model.get("license"):
        out["license"] = str(model.get("license"))
    return jsonify(out)


@api_route(bp, "/api/ps", tag=TAG, summary="Loaded models (Ollama)")
def ps() -> Response:
    svc = services()
    state = keep_alive()
    models = []
    for name, runner in sorted(svc.registry.loaded().items()):
        try:
            model = svc.registry.installed(name)
        except ModelNotFound:
            continue
        variant = runner.model.variant
        size = int(variant.size_bytes)
        models.append(
            {
                "name": tagged(name),
                "model": tagged(name),
                "size": size,
                "digest": digest(model),
                "details": details(model),
                "expires_at": rfc3339(state.expires_at(name)),
                "size_vram": 0 if runner.model.ep == "cpu" else size,
                "context_length": int(runner.model.context_length),
            }
        )
    return jsonify({"models": models})


@api_route(
    bp, "/api/chat", ("POST",), tag=TAG, summary="Chat (Ollama; JSON lines)", body=p.ChatRequest, streams=True
)
def chat(body: p.ChatRequest) -> Response:
    started = time.monotonic_ns()
    model = resolve(body.model)
    name = model.name
    seconds = parse_keep_alive(body.keep_alive)
    think = check_think(body.model, model, body.think)
    messages = openai_messages(body.model, body.messages)
    guidance = guidance_of(body.format)
    if not messages:
        return load_answer(body.model, name, seconds, {"message": {"role": "assistant", "content": ""}})
    runner, load_ns = load(name)
    svc = services()
    options = runtime_options(body.options, model_card(model).context_length, runner.model.parameters)
    plan = svc.tool_plan(name, messages, body.tools or None)
    if guidance is not None and plan.guidance is not None:
        raise InvalidOptions("format cannot be combined with tools the answer may call", param="format")
    top = body.top_logprobs if body.logprobs else None
    _, session = svc.chat(
        name,
        plan.messages,
        options,
        store=False,
        guidance=plan.guidance or guidance,
        tools=plan.tools,
        logprobs=top,
    )
    parser = plan.parser()

    def line(message: dict[str, Any]) -> dict[str, Any]:
        return {"model": body.model, "created_at": now_rfc3339(), "message": {"role": "assistant", **message}}

    return run_answer(
        session.stream,
        parser_fn(parser),
        parser,
        line,
        streaming=body.stream,
        think=think,
        started_ns=started,
        load_ns=load_ns,
        on_end=lambda: after(name, seconds),
        with_logprobs=top is not None,
    )


@api_route(
    bp,
    "/api/generate",
    ("POST",),
    tag=TAG,
    summary="Generate (Ollama; JSON lines)",
    body=p.GenerateRequest,
    streams=True,
)
def generate(body: p.GenerateRequest) -> Response:
    started = time.monotonic_ns()
    model = resolve(body.model)
    name = model.name
    seconds = parse_keep_alive(body.keep_alive)
    if body.template:
        raise InvalidOptions(
            "template overrides are not supported: the model's own chat template is used", param="template"
        )
    if body.context:
        raise InvalidOptions(
            "context (the old generate memory) is not supported: send the history to /api/chat",
            param="context",
        )
    no_images(body.model, body.images)
    if body.raw and body.system:
        raise InvalidOptions("raw mode does not support template, system, or context", param="raw")
    think = check_think(body.model, model, body.think)
    guidance = guidance_of(body.format)
    card = model_card(model)
    if body.suffix and card.fim is None:
        raise InvalidOptions(f"{json.dumps(body.model)} does not support insert", param="suffix")
    if not body.prompt and not body.suffix:
        return load_answer(body.model, name, seconds, {"response": ""})
    runner, load_ns = load(name)
    svc = services()
    options = runtime_options(body.options, card.context_length, runner.model.parameters)
    top = body.top_logprobs if body.logprobs else None
    if body.suffix:  # fill in the middle: the model's own markers, no chat template
        assert card.fim is not None
        prefix, suffix, middle = card.fim
        prompt, templated = f"{prefix}{body.prompt}{suffix}{body.suffix}{middle}", False
    else:
        prompt, templated = body.prompt, not body.raw
    _, stream = svc.complete(
        name, prompt, options, template=templated, system=body.system or None, logprobs=top, guidance=guidance
    )
    # a templated answer may open with reasoning (<think>): the model's parser splits it off
    parser = svc.tool_plan(name, [], None).parser() if templated else None

    def line(answer: dict[str, Any]) -> dict[str, Any]:
        out = {"model": body.model, "created_at": now_rfc3339(), "response": answer["content"]}
        if answer.get("thinking"):
            out["thinking"] = answer["thinking"]
        return out

    return run_answer(
        stream,
        parser_fn(parser),
        None,
        line,
        streaming=body.stream,
        think=think,
        started_ns=started,
        load_ns=load_ns,
        on_end=lambda: after(name, seconds),
        with_logprobs=top is not None,
    )


def embed_texts(name: str, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    """Vectors for `texts`; a text longer than the context is cut to it (`truncate`) or refused (400)."""
    svc = services()
    runner = svc.scheduler(name)
    context = int(runner.model.context_length)
    fitted = []
    for i, text in enumerate(texts):
        ids = runner.model.encode(text)
        decode = getattr(runner.model, "decode", None)
        # an embedding model's tokenizer already cuts at its max length: reaching it may mean more was sent
        embedder = decode is None
        too_long = len(ids) >= context if embedder else len(ids) + 1 > context
        if too_long and not truncate:
            raise InvalidOptions(
                f"input[{i}] exceeds the model's context length ({context} tokens); send truncate: true to cut it",
                param="input",
            )
        if too_long and decode is not None:
            text = decode(ids[: context - 1])
        fitted.append(text)
    _, result = svc.embed(name, fitted)
    return result.vectors, result.tokens


def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values renormalised (as Ollama's `dimensions`)."""
    if not dimensions:
        return vector
    if dimensions > len(vector):
        raise InvalidOptions(
            f"dimensions must be at most the model's embedding length ({len(vector)})", param="dimensions"
        )
    v = np.asarray(vector[:dimensions], dtype=np.float32)
    return (v / (np.linalg.norm(v) or 1.0)).tolist()  # type: ignore[no-any-return]


@api_route(bp, "/api/embed", ("POST",), tag=TAG, summary="Embeddings (Ollama)", body=p.EmbedRequest)
def embed(body: p.EmbedRequest) -> Response:
    started = time.monotonic_ns()
    model = resolve(body.model)
    seconds = parse_keep_alive(body.keep_alive)
    texts = [body.input] if isinstance(body.input, str) else body.input
    texts = [t for t in texts if t != ""] if isinstance(body.input, str) else texts
    _, load_ns = load(model.name)
    vectors, tokens = embed_texts(model.name, texts, body.truncate) if texts else ([], 0)
    after(model.name, seconds)
    return jsonify(
        {
            "model": body.model,
            "embeddings": [shorten(v, body.dimensions) for v in vectors],
            "total_duration": time.monotonic_ns() - started,
            "load_duration": load_ns,
            "prompt_eval_count": tokens,
        }
    )


@api_route(
    bp, "/api/embeddings", ("POST",), tag=TAG, summary="Embedding (Ollama, older)", body=p.EmbeddingsRequest
)
def embeddings(body: p.EmbeddingsRequest) -> Response:
    model = resolve(body.model)
    seconds = parse_keep_alive(body.keep_alive)
    load(model.name)
    vectors, _ = embed_texts(model.name, [body.prompt], True) if body.prompt else ([[]], 0)
    after(model.name, seconds)
    return jsonify({"embedding": vectors[0]})
