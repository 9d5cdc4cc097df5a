"""The Anthropic Messages dialect under `/v1/messages`."""

from .routes import bp

__all__ = ["bp"]
