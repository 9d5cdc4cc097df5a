"""The chat service dialect: kebab-case `/completions`, `/chat/*`, `/sessions`, `/readiness`, `WS /chat/ws`."""

from .routes import bp

__all__ = ["bp"]
