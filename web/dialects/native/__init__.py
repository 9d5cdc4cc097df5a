"""The native dialect (`/`, `/health`, `/api/models`, `/api/chat`, `/api/generate`, `/api/embeddings`)."""

from .routes import bp

__all__ = ["bp"]
