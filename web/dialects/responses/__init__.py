"""The OpenAI Responses API under `/v1/responses` (stateful: stored in the sessions database)."""

from .routes import bp

__all__ = ["bp"]
