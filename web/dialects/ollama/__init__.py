"""The Ollama dialect: Ollama's own API, served on the Ollama listener (registered under OLLAMA_PREFIX)."""

from .routes import bp

__all__ = ["bp"]
