"""The orchestrator dialect: `/models`, `/models/*/start|stop`, `/generate`."""

from .routes import bp

__all__ = ["bp"]
