"""Errors a user can act on. Each carries a one-line message and an HTTP status."""

from __future__ import annotations


class OrtllmError(Exception):
    """Base class: the message is shown as is, one line, no traceback. `hint` says what to do about it
    (the `details` of the /api/v1 dialect's error object); empty where the answer names a route or a header,
    which the web layer supplies by `code` (web/errors.py)."""

    status: int = 400
    code: str = "INVALID_REQUEST"
    hint: str = ""

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, when one is (OpenAI's error `param`)


class ModelNotFound(OrtllmError):
    """A name that is neither installed nor in the catalog (or not installed when required)."""

    status = 404
    code = "MODEL_NOT_FOUND"


class InvalidModelName(OrtllmError):
    """A model name that cannot be a store folder (path traversal, odd characters)."""


class InvalidSource(OrtllmError):
    """A conversion source string or file that cannot be used."""


class UnsupportedArchitecture(OrtllmError):
    """The chosen backend cannot convert this model architecture."""


class InvalidBuildOptions(OrtllmError):
    """A precision / execution provider / block size combination the builder cannot make."""


class MissingDependency(OrtllmError):
    """An optional dependency (the convert extra, optimum, an EP package) is not installed."""

    status = 501
    code = "MISSING_DEPENDENCY"


class NotEnoughDiskSpace(OrtllmError):
    """The store's file system cannot hold the conversion."""

    status = 507
    code = "INSUFFICIENT_STORAGE"
    hint = "Free space under ORTLLM_HOME (the model store) and retry"


class ConversionFailed(OrtllmError):
    """The builder or a download failed; the message names the cause and the log file."""

    status = 500
    code = "CONVERSION_FAILED"


class InvalidOptions(OrtllmError):
    """Generation options out of range, e.g. `temperature must be between 0.0 and 2.0`."""


class ContextOverflow(OrtllmError):
    """The prompt (plus at least one generated token) does not fit the context window."""

    code = "CONTEXT_LENGTH_EXCEEDED"
    hint = "Shorten the prompt or the conversation, or lower max_tokens"


class ModelLoadError(OrtllmError):
    """A model that exists but cannot be loaded here (EP missing, files damaged)."""

    status = 503
    code = "MODEL_LOAD_FAILED"
    hint = "The server log has the cause; `ortllm doctor` shows which runtime and variant each model uses"


class Busy(OrtllmError):
    """The model's request queue is full; retry later."""

    status = 503
    code = "SERVICE_UNAVAILABLE"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionNotFound(OrtllmError):
    """No chat session with that id."""

    status = 404
    code = "SESSION_NOT_FOUND"


class SessionStoreUnavailable(OrtllmError):
    """The sessions database cannot be opened, read or written (corrupt, read-only, disk full)."""

    status = 503
    code = "SERVICE_UNAVAILABLE"
    hint = (
        "Check the database named in the message: a corrupt SQLite file can be moved aside (an empty one is "
        "created at the next start) or restored from a backup; a database server that is down is retried "
        "after Retry-After seconds; generation without sessions keeps working"
    )
    retry_after = 5  # a database server restarting or failing over is usually back within seconds


class GenerationTimeout(OrtllmError):
    """A generation that did not finish within the configured time (it is cancelled)."""

    status = 504
    code = "TIMEOUT"
    hint = "Lower max_tokens, or retry when the server is less busy"


class GenerationFailed(OrtllmError):
    """The runtime failed while generating (the worker keeps serving other requests)."""

    status = 500
    code = "GENERATION_FAILED"
    hint = "The server log has the cause; the server keeps serving, so the request can be retried"


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """The first line of an exception's message (its type when the message is empty): onnxruntime and
    the builder raise C++ traces and long logs, of which users need the first line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


class MalformedJSON(InvalidOptions):
    """A body that is not JSON this server accepts (syntax, nesting, huge integers, lone surrogates)."""

    hint = (
        "Send one JSON object in UTF-8: nested at most 64 levels, integers of at most 100 digits, "
        "and no lone surrogate escapes (\\ud800-\\udfff must come in pairs)"
    )


class RequestTooLarge(OrtllmError):
    """More work in one request than the server's limits allow (embedding inputs or their tokens)."""

    status = 413
    code = "PAYLOAD_TOO_LARGE"
    hint = (
        "Split the input into several requests (limits: server.max_embedding_inputs and "
        "server.max_embedding_tokens in config.toml)"
    )


class RequestCancelled(OrtllmError):
    """A request dropped before it completed: its client went away or its model was unloaded."""

    status = 503
    code = "CANCELLED"
    hint = "Retry the request"
