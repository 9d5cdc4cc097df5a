"""The web UI's sessions under `/api/sessions`."""

from .routes import bp

__all__ = ["bp"]
