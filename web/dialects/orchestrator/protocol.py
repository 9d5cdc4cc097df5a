"""The orchestrator dialect's wire format (`/models`, `/generate`)."""

from __future__ import annotations

from pydantic import Field

from ...wire import (
    MaxTokens,
    Temperature,
    TopP,
    Wire,
)


class TGIModel(Wire):
    id: str
    name: str
    hf_name: str
    running: bool
    context_length: int
    quantization: str


class TGIModelList(Wire):
    models: list[TGIModel]


class TGIStarted(Wire):
    message: str
    port: int
    container_name: str
    already_running: bool  # the model was loaded before this call (the seed: "returns existing info")


class TGIGenerateRequest(Wire):
    model_id: str
    prompt: str = Field(min_length=1)
    max_new_tokens: MaxTokens = Field(200, ge=1)
    temperature: Temperature = 0.7
    top_p: TopP = 0.95


class TGIGenerateResponse(Wire):
    generated_text: str
    model_id: str


class TGIStopped(Wire):
    message: str
