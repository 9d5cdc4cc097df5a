"""og.Engine's failure modes on the real model: a failed turn must not leave the model refusing every request."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ortllm.errors import GenerationFailed
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import ERROR, GenerationRequest
from tests.conftest import DEFAULT_MODEL, QUESTION

og = pytest.importorskip("onnxruntime_genai")

REAL_ENGINE = og.Engine
UNHEALTHY = (
    "Static-batch execution failed and the Engine is no longer healthy. Cause: Error computing mask: panic"
)


class Unhealthy:
    """og.Engine as seen on CUDA after a guidance error: one turn ends FAILED, then every request is refused."""

    made = 0

    def __init__(self, model: Any) -> None:
        type(self).made += 1
        self.real = REAL_ENGINE(model)
        self.broken = type(self).made == 1  # only the first Engine breaks; a fresh one is healthy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def create_request(self, **kw: Any) -> Any:
        if self.broken and getattr(self, "failed", False):
            raise RuntimeError(UNHEALTHY)
        return self.real.create_request(**kw)

    def run(self, buffer: Any) -> list[Any]:
        events = list(self.real.run(buffer))
        if not self.broken or getattr(self, "failed", False):
            return events
        self.failed = True
        return [
            SimpleNamespace(
                request=e.request,
                flags=og.EngineEventFlags.FAILED,
                token=0,
                usage=None,
                finish_reason=og.FinishReason.FAILED,
                error_code=og.EngineErrorCode.ENGINE_EXECUTION_FAILURE,
            )
            for e in events
        ]


@pytest.fixture
def engine_sched(pulled, monkeypatch):
    from ortllm.runtime.backends import engine_pool
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler, engine_supported
    from ortllm.store import ModelStore

    if not engine_supported():
        pytest.skip("needs the 0.18 Engine")
    Unhealthy.made = 0
    monkeypatch.setattr(engine_pool.og, "Engine", Unhealthy)
    scheduler = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="engine"), batcher="engine")
    yield scheduler
    scheduler.close()


def ask(scheduler: Any) -> Any:
    options = validate_options({"temperature": 0, "max_tokens": 24})
    return scheduler.generate(GenerationRequest(options, messages=QUESTION))


def test_a_failed_turn_gets_a_fresh_engine_and_the_next_request_is_answered(engine_sched):
    with pytest.raises(GenerationFailed, match=r"^generation failed \(ENGINE_EXECUTION_FAILURE\)$"):
        ask(engine_sched)
    second = ask(engine_sched)  # before the fix: "could not start generation: ... no longer healthy", forever
    assert second.finish_reason != ERROR and "Paris" in second.text
    assert Unhealthy.made == 2


def test_an_engine_that_refuses_the_model_fails_the_request_instead_of_hanging(pulled, monkeypatch):
    """og.Engine 0.18 refuses some model types ("Expected a decoder-only model", LFM2): the request must fail
    with that reason, and the worker must live on for the next one."""
    import threading

    from ortllm.runtime.backends import engine_pool
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler, engine_supported
    from ortllm.store import ModelStore

    if not engine_supported():
        pytest.skip("needs the 0.18 Engine")

    class Refusing:
        create_request = REAL_ENGINE.create_request  # the 0.18 API, as far as engine_supported() looks

        def __init__(self, model: Any) -> None:
            raise RuntimeError("Expected a decoder-only model\nwith a C++ trace")

    monkeypatch.setattr(engine_pool.og, "Engine", Refusing)
    scheduler = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="engine"), batcher="engine")
    try:
        errors: list[str] = []

        def two_requests() -> None:
            for _ in range(2):
                try:
                    ask(scheduler)
                except GenerationFailed as exc:
                    errors.append(str(exc))

        worker = threading.Thread(target=two_requests, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the request hung"  # before the fix: the worker died, the caller waited
        assert errors == ["could not start generation: Expected a decoder-only model"] * 2
    finally:
        scheduler.close()
