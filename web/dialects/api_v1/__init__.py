"""The `/api/v1` dialect: generate with latency, a `{token, finished}` stream, models, batches."""

from .routes import bp

__all__ = ["bp"]
