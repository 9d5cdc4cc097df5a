"""Embedding models (manifest kind "embedding"): plain onnxruntime, not onnxruntime-genai.

The optimum backend exports an encoder (e.g. sentence-transformers' all-MiniLM-L6-v2) with its
`last_hidden_state` output and writes `embedding_config.json` (pooling, normalisation, max
length). Here the tokenizer (the `tokenizers` package) and an InferenceSession turn texts into
vectors the way sentence-transformers does: tokens truncated to the model's max_seq_length,
mean pooling under the attention mask, L2 normalisation.

`Embedder` is the registry's Runner for such a model: it Embeds and does not Generate (callers check
with `isinstance(runner, Generates)` and answer `not_generative(name)`, a 400).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ortllm.errors import InvalidOptions, ModelLoadError, RequestCancelled, first_line
from ortllm.store import InstalledModel, Variant

from .loaded import ModelInfo, default_threads
from .types import Embeddings, RequestLimits, embedding_tokens

log = logging.getLogger("ortllm.runtime")

EMBEDDING_CONFIG = "embedding_config.json"
MAX_BATCH = 32  # texts per session run (padded to the longest of the batch)


def is_embedding_model(installed: InstalledModel) -> bool:
    """A store entry served by `Embedder` (its manifest kind, or a variant the optimum backend marked)."""
    return installed.kind == "embedding" or any(
        v.info.get("kind") == "embedding" or (v.path / EMBEDDING_CONFIG).is_file()
        for v in installed.variants.values()
    )


def not_generative(name: str) -> InvalidOptions:
    """The error for a generation request to an embedding model."""
    return InvalidOptions(
        f"Model '{name}' is an embedding model: it cannot generate text, only compute embeddings"
    )


class EmbeddingModel:
    """The loaded encoder: session, tokenizer and pooling settings (the `model` of an Embedder)."""

    def __init__(
        self, installed: InstalledModel, *, force_ep: str | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.installed = installed
        self.name = installed.name
        if force_ep not in (None, "cpu"):
            raise ModelLoadError(f"Embedding model '{self.name}' runs on cpu only (asked for {force_ep})")
        variants = [v for v in installed.variants.values() if (v.path / EMBEDDING_CONFIG).is_file()]
        if not variants:
            raise ModelLoadError(
                f"Model '{self.name}' has no embedding export ({EMBEDDING_CONFIG} missing); reconvert it with "
                "the optimum backend (make optimum-env)"
            )
        # full precision first: it is what the vectors are checked against
        order = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}
        self.variant: Variant = min(variants, key=lambda v: order.get(v.precision, 9))
        self.path: Path = self.variant.path
        self.ep = "cpu"
        self.reason = "embedding models run on onnxruntime's cpu provider"
        self.config: dict[str, Any] = json.loads((self.path / EMBEDDING_CONFIG).read_text(encoding="utf-8"))
        self.max_length = int(self.config.get("max_length") or 512)
        self.context_length = self.max_length
        self.pooling = str(self.config.get("pooling", "mean"))
        self.normalize = bool(self.config.get("normalize", True))
        self.threads = threads or default_threads()
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(self.path / self.config.get("filename", "model.onnx")),
                options,
                providers=["CPUExecutionProvider"],
            )
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load embedding model '{self.name}' ({self.variant.id}): {first_line(exc)}"
            ) from exc
        # sentence-transformers truncates to max_seq_length and pads per batch (tokenizer.json's own
        # fixed padding/truncation, e.g. 128, is replaced)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = str(self.config.get("output", "last_hidden_state"))
        self.pad_id = int(self.config.get("pad_token_id", 0))
        log.info(
            "loaded embedding model %s (%s, %s pooling, max %d tokens)",
            self.name,
            self.variant.id,
            self.pooling,
            self.max_length,
        )

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            self.name, self.variant.id, self.ep, self.reason, self.context_length, self.threads, "onnxruntime"
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return {}

    def encode(self, text: str) -> list[int]:
        """Token ids as the model sees them (special tokens added, truncated to max_length)."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        return self.embed_encodings(self.tokenizer.encode_batch(texts))

    def embed_encodings(self, encodings: list[Any]) -> np.ndarray:
        """Vectors of texts the tokenizer has encoded (padded to the longest of them)."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = enc.attention_mask
            types[row, :n] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(
            [self.output_name], {k: v for k, v in feeds.items() if k in self.input_names}
        )[0]
        vectors = pool(hidden.astype(np.float32), mask, self.pooling)
        if self.normalize:
            vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return vectors


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers' pooling modes over [batch, tokens, dim] under the attention mask."""
    m = mask[..., None].astype(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(axis=1)
    if mode == "last":
        return hidden[np.arange(hidden.shape[0]), mask.sum(axis=1) - 1]
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    return summed / (np.sqrt(counts) if mode == "mean_sqrt_len" else counts)


class Embedder:
    """The Runner of an embedding model: it Embeds (texts longer than the model's max_length are
    truncated, as sentence-transformers does); it does not Generate."""

    def __init__(
        self,
        installed: InstalledModel,
        *,
        force_ep: str | None = None,
        threads: int | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self.model = EmbeddingModel(installed, force_ep=force_ep, threads=threads)
        self.crashed: str | None = None  # no worker thread to crash (see Scheduler.crashed)
        self.limits = limits or RequestLimits()
        self._active = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def active_count(self) -> int:
        return self._active

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalised vector per text (sentence-transformers' encode with normalisation)."""
        return self.embed_texts(texts).vectors

    def embed_texts(self, texts: list[str], client_gone: Callable[[], bool] | None = None) -> Embeddings:
        """`embed` with the token count, checked against the limits first; it stops between batches when
        the model is unloaded or `client_gone()` turns true."""
        encodings: list[Any] = []

        def encode(text: str) -> list[int]:
            encodings.append(self.model.tokenizer.encode(text))
            return list(encodings[-1].ids)

        tokens = sum(len(ids) for ids in embedding_tokens(texts, encode, self.limits))
        with self._lock:
            self._active += 1
        try:
            out: list[list[float]] = []
            for start in range(0, len(encodings), MAX_BATCH):
                if self._closed.is_set():
                    raise ModelLoadError(f"Model '{self.model.name}' is being unloaded")
                if client_gone is not None and client_gone():
                    raise RequestCancelled("The embeddings request was cancelled: its client went away")
                out.extend(self.model.embed_encodings(encodings[start : start + MAX_BATCH]).tolist())
            return Embeddings(out, tokens)
        finally:
            with self._lock:
                self._active -= 1

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()  # requests in progress stop before their next batch
        self.model.session = None  # type: ignore[assignment]
