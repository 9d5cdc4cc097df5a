"""ortllm: a portable local LLM runtime on ONNX Runtime GenAI."""

__version__ = "0.1.0"
