"""The OpenAI-compatible dialect under `/v1`."""

from .routes import bp

__all__ = ["bp"]
