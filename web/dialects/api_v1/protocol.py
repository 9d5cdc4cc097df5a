"""The `/api/v1` dialect's wire format."""

from __future__ import annotations

from pydantic import Field

from ...wire import (
    MaxTokens,
    StopList,
    Temperature,
    TopK,
    TopP,
    Usage,
    Wire,
)


class SpecGenerateRequest(Wire):
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="absent or 'default': the first loaded model")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stop: StopList | None = None
    stream: bool = False


class SpecGenerateResponse(Wire):
    text: str
    usage: Usage
    latency: float


class SpecBatchRequest(Wire):
    requests: list[SpecGenerateRequest] = Field(min_length=1, max_length=64)


class SpecBatchResponse(Wire):
    results: list[SpecGenerateResponse]


class SpecModel(Wire):
    name: str
    format: str
    size: str
    loaded: bool
    memory_usage: str
    quantization: str


class SpecLoaded(SpecModel):
    device: str = Field(description="the execution provider the model was loaded on")


class SpecModelList(Wire):
    models: list[SpecModel]


class SpecLoadRequest(Wire):
    quantization: str | None = Field(None, description="e.g. q4_0, int4, int8, fp16, fp32")
    prefer_gpu: bool = False
