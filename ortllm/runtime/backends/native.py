"""ortllm's own continuous batching for CPU models, on plain onnxruntime.

The CPU og.Engine runs static batches: a request that arrives while a batch runs cannot join it.
The builder's decoder graph does not need that restriction: its GroupQueryAttention reads each
sequence's own length from the attention mask (`seqlens_k`), writes new keys and values at that
sequence's offset, and rotates positions from it. So one onnxruntime session over the same
`model.onnx` can step a batch whose rows have different lengths, and the batch can change at every step.

- `KVArena`: one key/value buffer per layer, `(slots, kv_heads, capacity, head_size)`, bound as both
  past and present (the shared-buffer mode of GroupQueryAttention: no copy per step). Rows that decode
  together occupy slots `0..B-1`, so a step binds a contiguous prefix of every buffer.
- `NativeDecoder`: the session and its bindings; `step(ids, lengths, first_slot)` runs one forward pass.
- `NativeBatcher`: the policy. Requests join at the next step; prompts are prefilled in chunks between
  decode steps (a long prompt does not freeze the others' streams; with onnxruntime 1.32's `query_seqlens`
  several prompts' chunks share one pass, right-padded); a finished sequence leaves its
  tokens in its slot, and a new prompt starts in the free slot sharing its longest prefix (turn 5 of a
  chat re-reads only the new turn; `cached_prompt_tokens` reports it).
- `adjust()` + `pick()`: repetition penalty over the last repeat_last_n tokens, presence and frequency
  penalties, logit_bias, min_tokens and the grammar's mask; then temperature, top-k, top-p, min-p and
  per-request seeds, in numpy; log-probabilities from the adjusted logits.

- Constrained output (JSON schema, regex, Lark grammars: response_format and tool calls) is decoded here
  too, batched with everything else: a grammar's token mask (llguidance, see runtime.constrain) is applied
  to the row's logits before sampling.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ortllm.errors import first_line

from ..job import Job
from ..sampling import adjust, pick, sample  # noqa: F401  (sample: the one-call form, for tests)

log = logging.getLogger("ortllm.native")

MAX_BATCH = 16  # sequences decoding together (and KV slots)
PREFILL_CHUNK = 128  # prompt tokens per forward pass while other sequences are decoding
PREFILL_CHUNK_IDLE = 512  # ... and when nothing else is waiting for its next token
KV_BUDGET_FRACTION = 0.5  # at most this share of RAM for the KV arena
INITIAL_CAPACITY = (
    1024  # tokens per slot at first; doubled (up to the context length) when a request needs more
)
WARM_SLOTS = 4  # KV slots whose memory is faulted in while idle (the first use of a cold one costs 0.1–0.4 s)
KEEP_CACHE_S = 300.0  # a finished sequence's cache outranks a fresh slot for this long (then it is fair game)
MIN_ORT = (1, 22)  # GroupQueryAttention with per-row lengths and chunked prompts on CPU
# batched prefill: rows that share a step's budget when the oldest prompt is long (2: 2 × 64 tokens, not
# 1 × 128: more tokens per second, but the oldest prompt's first token comes later; see NOTES.md lever 14)
RAGGED_SPLIT = 1
# a prefill pass also steps the decoding rows when their padding (rows × (chunk - 1)) is at most this many
# tokens. 0: only in passes of one token per row, where the numbers stay exact (a token inside a longer
# pass takes MatMulNBits' multi-row path: SmolLM2's logits move by up to 0.5 and greedy answers change)
MERGE_PAD_TOKENS = 0
# speculative decoding (prompt lookup): a decoding row whose last tokens occurred earlier in its sequence
# (prompt or answer) also feeds the tokens that followed them there, and one pass checks them all: each
# position's logits are sampled as usual and a drafted token is kept while it equals the sampled one, so
# the answer is the one plain decoding samples (see NativeBatcher._decode)
SPEC_MAX_DRAFT = 4  # drafted tokens per row and pass
SPEC_NGRAMS = (4, 3, 2)  # suffix lengths looked up, longest first
SPEC_WINDOW = 4096  # the last tokens searched
SPEC_MAX_ROWS = 4  # more rows decoding together: their padding costs more than drafts win
SPEC_PRIOR = 0.6  # a new request's assumed chance that a drafted token is kept
# a pass of R rows of W tokens costs 1 + SPEC_SLOPE·R·(W − 1) one-token passes of R rows (measured, one row:
# Qwen2.5-0.5B 1.00/1.16/1.28/1.43 for W = 2..5, SmolLM2-135M 1.11/1.36/1.5/1.64). A fixed model, not timed
# passes: the same request alone then drafts the same way every time, and answers the same
SPEC_SLOPE = 0.15
# ORTLLM_PREFILL=int8: passes feeding this many tokens or more a row run on the int8 prefill graph
PREFILL_INT8_MIN = 16
# int8 keys and values (ORTLLM_KV_CACHE=int8): GroupQueryAttention's per-channel quantised cache with
# static scales, each channel's largest magnitude over a calibration text × this margin / 127 (values
# beyond it saturate; at margin 0.5 SmolLM2's perplexity doubled, at 1.0 and 1.5 it rose by 0.4 %)
KV_INT8_MARGIN = 1.5
# the calibration text: a chat turn, prose, code and numbers (rendered with the model's chat template)
KV_CALIBRATION = [
    {
        "role": "system",
        "content": "You are a helpful assistant. Answer briefly and cite the text you were given.",
    },
    {
        "role": "user",
        "content": (
            "Summarise this passage, then fix the function below.\n\n"
            "The library reads its settings from a file in the user's home folder, then from environment "
            "variables, then from the command line; a later source overrides an earlier one. Paths may use "
            "~ for the home folder. Numbers such as 4096, 0.75 or 1e-6 are read as written, and a list is "
            "written one item a line. On 12 March 2024 version 3.2 added TLS, retries (3 by default) and a "
            "timeout of 30 s; see https://example.org/docs/settings#network for the details.\n\n"
            "```python\ndef mean(values: list[float]) -> float:\n    total = 0\n    for v in values:\n"
            "        total += v\n    return total / len(values)  # fails on []\n```"
        ),
    },
    {
        "role": "assistant",
        "content": (
            "Settings come from a file, the environment and the command line, later ones winning; version "
            "3.2 added TLS, three retries and a 30-second timeout.\n\n```python\ndef mean(values: "
            'list[float]) -> float:\n    if not values:\n        raise ValueError("mean of no values")\n'
            "    return sum(values) / len(values)\n```\nThe empty list now raises a clear error instead of "
            "ZeroDivisionError."
        ),
    },
    {"role": "user", "content": "Thanks! Now translate the first sentence into French and German, please."},
]
_DTYPES = {1: np.float32, 10: np.float16}
_NO_TOKENS = np.zeros(0, dtype=np.int64)


def inspect_decoder(path: Path, genai_cfg: dict[str, Any], ep: str) -> tuple[Any, str | None]:
    """The decoder (an onnx ModelProto without its weights) when the native batcher can run it, else
    None and why not. NativeDecoder takes the proto, so the graph is read once per load."""
    import onnxruntime as ort

    if ep != "cpu":
        return None, f"the native batcher runs on CPU only (this variant is for {ep})"
    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ORT:
        return None, f"onnxruntime {ort.__version__} is older than {'.'.join(map(str, MIN_ORT))}"
    model = genai_cfg.get("model", {})
    decoder = model.get("decoder", {})
    if set(model) & {"vision", "speech", "encoder", "embedding"} or "pipeline" in decoder:
        return None, "multi-part models run on og.Engine"
    filename = decoder.get("filename")
    if not filename or not (path / filename).is_file():
        return None, "no single decoder file"
    try:
        import onnx

        proto = onnx.load(str(path / filename), load_external_data=False)
    except Exception as exc:  # an unreadable graph is og.Engine's problem to report
        return None, f"cannot read the decoder graph: {exc}"
    why = _graph_unsupported(proto.graph, int(decoder.get("num_hidden_layers", 0)))
    return (None, why) if why else (proto, None)


@functools.cache  # reading every operator schema takes ~50 ms
def ragged_supported() -> bool:
    """Whether this onnxruntime's GroupQueryAttention takes `query_seqlens` (1.32: right-padded chunks of
    several rows with past context in one pass; 1.31 and older refuse batch > 1 for such chunks)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as capi

        return any(
            s.name == "GroupQueryAttention"
            and s.domain == "com.microsoft"
            and any(i.name == "query_seqlens" for i in s.inputs)
            for s in capi.get_all_operator_schema()
        )
    except Exception:  # an onnxruntime without schema introspection: the one-row-per-chunk path
        return False


def _graph_unsupported(graph: Any, layers: int) -> str | None:
    inputs = {i.name for i in graph.input}
    expected = {"input_ids", "attention_mask"} | {
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")
    }
    if inputs != expected:
        if any(name.endswith(".conv") for name in inputs - expected):  # LFM2's short-convolution layers
            return "the decoder keeps convolution states (short-conv layers), which the native batcher does not keep"
        return f"decoder inputs differ from the builder's layout ({', '.join(sorted(inputs - expected)) or 'missing'})"
    gqa = sum(1 for n in graph.node if n.op_type == "GroupQueryAttention")
    if gqa != layers:
        return "the decoder does not use GroupQueryAttention in every layer"
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    if past.type.tensor_type.elem_type not in _DTYPES:
        return "quantised KV caches run on og.Engine"
    return None


class KVArena:
    """Keys and values of `slots` sequences, `capacity` tokens each. onnxruntime touches a slot's whole
    buffer the first time it is bound, so the capacity starts small and grows on demand."""

    def __init__(
        self, layers: int, kv_heads: int, head_size: int, capacity: int, slots: int, dtype: Any
    ) -> None:
        self.capacity = capacity
        self.data = np.zeros((2 * layers, slots, kv_heads, capacity, head_size), dtype=dtype)
        # slots whose pages are in memory: np.zeros maps them lazily and the first step that binds a
        # slot pays the page faults (0.1–0.4 s for 47 MB on a small VM); idle time faults them in instead
        self.warm = np.zeros(slots, dtype=bool)
        self._warming = (-1, 0)  # (slot, next part)

    def mark_warm(self, first: int, rows: int) -> None:
        self.warm[first : first + rows] = True

    def warm_up(self, limit: int) -> bool:
        """Fault in one part (one layer's keys or values) of the first cold slot among the first `limit`;
        False when they are all warm. Content is kept (x += 0), so any slot may be warmed."""
        cold = np.flatnonzero(~self.warm[:limit])
        if not cold.size:
            return False
        slot = int(cold[0])
        part = self._warming[1] if self._warming[0] == slot else 0
        view = self.data[part, slot]
        np.add(view, 0, out=view)
        part += 1
        if part == self.data.shape[0]:
            self.warm[slot] = True
            part = 0
        self._warming = (slot, part)
        return True

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_size: int, dtype: Any) -> int:
        return 2 * layers * kv_heads * head_size * np.dtype(dtype).itemsize

    def copy_prefix(self, src: int, dst: int, length: int, start: int = 0) -> None:
        """Positions start..length-1 of slot src into slot dst."""
        self.data[:, dst, :, start:length] = self.data[:, src, :, start:length]

    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        """Exchange the first `len_a` / `len_b` positions of slots a and b."""
        if a == b:
            return
        keep = self.data[:, a, :, :len_a].copy()
        self.data[:, a, :, :len_b] = self.data[:, b, :, :len_b]
        self.data[:, b, :, :len_a] = keep


class NativeDecoder:
    """One onnxruntime session over the builder's decoder, stepping rows of different lengths."""

    def __init__(
        self,
        path: Path,
        genai_cfg: dict[str, Any],
        *,
        threads: int | None,
        max_batch: int = MAX_BATCH,
        proto: Any = None,
    ) -> None:
        """`proto`: the decoder as inspect_decoder() read it (read here when not given)."""
        import onnxruntime as ort
        import psutil

        self._ort = ort
        decoder = genai_cfg["model"]["decoder"]
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self._threads, self._path = threads, path
        options = self._session_options()
        if proto is None:
            import onnx

            proto = onnx.load(str(path / decoder["filename"]), load_external_data=False)
        # rows of different chunk lengths in one pass (right-padded; see ragged_supported)
        self.ragged = ragged_supported() and _add_query_seqlens(proto)
        graph = _last_position_only(proto, ragged=self.ragged)
        self.last_only = graph is not None  # logits of the last position only (prompt chunks skip the rest)
        if graph is None and self.ragged:
            graph = proto.SerializeToString()
        self._options, self._proto, self._max_batch = options, proto, max_batch
        # sliding-window attention (Gemma 2/3): GroupQueryAttention refuses a KV buffer below the window
        self._window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)
        self._context = int(genai_cfg["model"].get("context_length") or 2048)
        self._memory = psutil.virtual_memory().total
        self._open(graph if graph is not None else str(path / decoder["filename"]))
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = np.float16 if "float16" in logits.type else np.float32
        self.vocab = int(genai_cfg["model"].get("vocab_size") or logits.shape[-1])

    def _session_options(self) -> Any:
        options = self._ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # graphs handed over as bytes (ours are rewritten) find their weights beside the model file
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self._path)
        )
        return options

    def _open(self, graph: bytes | str) -> None:
        """The session over `graph` (serialised, or a file) and an empty arena sized for its cache type."""
        self.session = self._ort.InferenceSession(graph, self._options, providers=["CPUExecutionProvider"])
        past = next(i for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        self.dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(past.type, np.float32)
        per_token = KVArena.bytes_per_token(self.layers, self.kv_heads, self.head_size, self.dtype)
        budget = self._memory * KV_BUDGET_FRACTION
        self.slots = max(1, min(self._max_batch, int(budget // (per_token * INITIAL_CAPACITY))))
        # the longest sequence (prompt + answer) the arena may grow to; longer ones go to og.Engine
        self.max_capacity = max(1, min(self._context, int(budget // (per_token * self.slots))))
        self.initial_capacity = min(INITIAL_CAPACITY, self.max_capacity)  # and where it shrinks back to
        self.arena = KVArena(
            self.layers, self.kv_heads, self.head_size, self.initial_capacity, self.slots, self.dtype
        )
        self._bindings: dict[tuple[int, int, int], Any] = {}
        self._logits: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}
        self._prefill: Any = None  # the int8 prefill session (enable_int8_prefill), sharing the arena

    def quantize_kv(self, tokens: list[int]) -> np.ndarray:
        """Switch to int8 keys and values (a quarter of float32's bytes: four times the context or the
        slots in the same memory, and less to read per decode step at long contexts). Per-channel scales
        come from `tokens` (a calibration text) run through the float cache; returns them
        ((2 · layers) × kv_heads × head_size, keys and values of layer i at 2i and 2i + 1). Call before
        the first request: the arena starts empty."""
        if self.dtype == np.int8:
            raise ValueError("the KV cache is int8 already")
        if self._prefill is not None:
            raise ValueError("quantise the KV cache before enabling the int8 prefill")
        if self.dtype != np.float32:
            raise ValueError("an int8 KV cache needs a float32 decoder graph")
        n = min(len(tokens), self.max_capacity - 1)
        if n < 2:
            raise ValueError("calibrating an int8 KV cache needs a text of 2 tokens or more")
        self.reserve(n, [0] * self.slots)
        self.step(np.asarray([tokens[:n]], dtype=np.int64), np.zeros(1, dtype=np.int64))
        peak = np.abs(self.arena.data[:, 0, :, :n]).max(axis=2)  # (2 · layers, kv_heads, head_size)
        # keys are stored rotated: channels i and i + head_size/2 trade magnitude with the position
        half = self.head_size // 2
        keys = peak[0::2]
        peak[0::2] = np.maximum(keys, np.concatenate([keys[..., half:], keys[..., :half]], axis=-1))
        scales = (np.maximum(peak, 1e-6) * KV_INT8_MARGIN / 127.0).astype(np.float32)
        _quantize_kv_cache(self._proto, scales)
        self._open(self._proto.SerializeToString())
        return scales

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    def reserve(self, tokens: int, lengths: list[int]) -> None:
        """Grow every slot to hold `tokens` (≤ max_capacity), keeping each slot's first `lengths[i]`."""
        if tokens <= self.arena.capacity:
            return
        if tokens > self.max_capacity:
            raise ValueError(f"{tokens} tokens exceed the native batcher's {self.max_capacity}")
        capacity = self.arena.capacity
        while capacity < tokens:
            capacity *= 2
        self.resize(min(capacity, self.max_capacity), lengths)

    def resize(self, capacity: int, lengths: list[int]) -> None:
        """A new arena of `capacity` tokens per slot holding each slot's first `lengths[i]` (≤ capacity):
        grown when a sequence needs it, shrunk again when the long ones are gone (memory follows use)."""
        old = self.arena
        self.arena = KVArena(self.layers, self.kv_heads, self.head_size, capacity, self.slots, self.dtype)
        for i, n in enumerate(lengths):
            self.arena.data[:, i, :, :n] = old.data[:, i, :, :n]
        self._bindings.clear()
        log.info("KV arena: %d tokens per slot", capacity)

    def enable_int8_prefill(self, tokens: list[int]) -> None:
        """Run prompt chunks of PREFILL_INT8_MIN tokens or more through an int8 copy of the graph
        (runtime.backends.prefill8: 1.6–1.9x faster on CPUs with VNNI; about two bytes a weight more memory,
        our int8 copy and onnxruntime's packed one);
        `tokens`, a calibration text, sets its channel smoothing. Decode steps stay on the model's weights."""
        from .prefill8 import calibration_graph, prefill_graph

        n = min(len(tokens), self.max_capacity - 1)
        if n < 2:
            raise ValueError("calibrating the int8 prefill needs a text of 2 tokens or more")
        opset = next((o.version for o in self._proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 18:  # ReduceMax with its axes as an input
            raise ValueError(
                f"the int8 prefill needs a decoder graph of ONNX opset 18 or newer (this one: {opset})"
            )
        calibration, names = calibration_graph(self._proto)
        options = self._session_options()
        options.enable_cpu_mem_arena = False  # its memory goes back to the system when it is gone
        session = self._ort.InferenceSession(
            calibration.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        ids = np.asarray([tokens[:n]], dtype=np.int64)
        capacity = max(n, self._window)
        feeds: dict[str, Any] = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feeds[value.name] = ids
            elif value.name == "attention_mask":
                feeds[value.name] = np.ones_like(ids)
            elif value.name == "query_seqlens":
                feeds[value.name] = np.asarray([n], dtype=np.int32)
            elif value.name == "ortllm_last_index":
                feeds[value.name] = np.full((1, 1, 1), n - 1, dtype=np.int64)
            elif value.name.startswith("past_key_values."):
                feeds[value.name] = np.zeros((1, self.kv_heads, capacity, self.head_size), dtype=self.dtype)
            else:
                raise ValueError(f"unexpected decoder input {value.name!r}")
        values = session.run(names, feeds)
        del session
        peaks = {
            name: np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            for name, v in zip(names, values, strict=True)
        }
        graph, weights = prefill_graph(self._proto, self._path, peaks)
        options = self._session_options()
        values = [self._ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()]
        options.add_external_initializers(list(weights), values)
        try:
            self._prefill = self._ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own refusal, in one line
            raise ValueError(f"onnxruntime refused the int8 prefill graph: {first_line(exc)}") from exc
        self._prefill_weights = (weights, values)  # onnxruntime reads them in place: keep them alive
        self._bindings.clear()
        _trim_heap()

    def _binding(self, first: int, rows: int, prefill: bool = False) -> Any:
        """An IOBinding whose past and present buffers are slots first..first+rows-1 (cached), on the
        decoder's session or (prefill) the int8 prefill's."""
        key = (first, rows, int(prefill))
        io = self._bindings.get(key)
        if io is None:
            io = (self._prefill if prefill else self.session).io_binding()
            data = self.arena.data
            for layer in range(self.layers):
                for k, kind in enumerate(("key", "value")):
                    value = self._ort.OrtValue.ortvalue_from_numpy(data[2 * layer + k, first : first + rows])
                    io.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                    io.bind_ortvalue_output(f"present.{layer}.{kind}", value)
            self._bindings[key] = io
        return io

    @property
    def int8_prefill(self) -> bool:
        """Whether prompt chunks run on the int8 prefill graph (enable_int8_prefill)."""
        return self._prefill is not None

    @property
    def verifies(self) -> bool:
        """Whether a pass can return the logits of every new token of ragged rows (speculative decoding)."""
        return self.ragged and self.last_only

    def step(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        first: int = 0,
        counts: np.ndarray | None = None,
        every: bool = False,
    ) -> np.ndarray:
        """Feed `ids` (rows × new tokens) to slots first.. whose caches hold `lengths` tokens;
        returns the logits of each row's last new token (rows × vocab). `counts`: the valid tokens of
        each row (rows right-padded to the longest; only when `ragged`), all of them when None.
        `every` (only when `verifies`): the logits of every new token instead (rows × new × vocab; a
        row's padding repeats its last valid token's)."""
        if every and not self.verifies:
            raise ValueError("this decoder cannot return every position's logits")
        rows, new = ids.shape
        if counts is None:
            counts = np.full(rows, new, dtype=np.int64)
        elif not self.ragged and bool((counts != new).any()):
            raise ValueError("rows of different lengths need onnxruntime's query_seqlens (1.32)")
        total = lengths + counts
        # a padded chunk is written whole before its padding is dropped: P + S must fit the buffer
        if int((lengths + new).max()) > self.capacity:
            raise ValueError(f"sequence longer than the context window ({self.capacity} tokens)")
        mask = (np.arange(int(total.max()))[None, :] < total[:, None]).astype(np.int64)
        # a prompt chunk goes to the int8 prefill graph when there is one; decode steps and verifying
        # passes (a few tokens a row) stay on the model's own weights
        prefill = self._prefill is not None and not every and new >= PREFILL_INT8_MIN
        io = self._binding(first, rows, prefill)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", mask)
        positions = new if every or not self.last_only else 1
        if self.ragged:
            io.bind_cpu_input("query_seqlens", counts.astype(np.int32))
            if self.last_only:
                last = (counts - 1)[:, None]
                at = np.minimum(np.arange(positions)[None, :], last) if every else last
                io.bind_cpu_input("ortllm_last_index", at.astype(np.int64).reshape(rows, positions, 1))
        # logits land in a buffer of ours (no per-step wrapping of every output)
        out = self._logits.get((rows, positions))
        if out is None:
            if len(self._logits) > 64:
                self._logits.clear()
            array = np.empty((rows, positions, self.vocab), dtype=self.logits_dtype)
            out = self._logits[(rows, positions)] = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
        io.bind_ortvalue_output("logits", out[1])
        (self._prefill if prefill else self.session).run_with_iobinding(io)
        self.arena.mark_warm(first, rows)
        if every:
            return np.array(out[0], dtype=np.float32)  # a copy: the buffer is reused by the next pass
        if self.ragged and not self.last_only:
            return np.asarray(out[0][np.arange(rows), counts - 1, :], dtype=np.float32)
        return np.asarray(out[0][:, -1, :], dtype=np.float32)


def _add_query_seqlens(model: Any) -> bool:
    """Give every GroupQueryAttention node the graph input `query_seqlens` (valid tokens per row, int32),
    in place; False (graph unchanged) when a node already uses that slot."""
    from onnx import TensorProto, helper

    slot = 16  # query_seqlens in the com.microsoft GroupQueryAttention schema of onnxruntime 1.32
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes or any(len(n.input) > slot and n.input[slot] for n in nodes):
        return False
    for node in nodes:
        while len(node.input) < slot:
            node.input.append("")
        node.input.append("query_seqlens")
    model.graph.input.append(
        helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, ["batch_size"])
    )
    return True


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc): building the prefill graph frees ~1.5 GB of
    temporaries at 1B that would otherwise stay in the process's resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def _quantize_kv_cache(model: Any, scales: np.ndarray) -> None:
    """Every GroupQueryAttention node keeps its cache as int8 with per-channel `scales` (see
    NativeDecoder.quantize_kv); the graph's past and present tensors become int8. In place."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = int(node.input[3].split(".")[1])  # past_key_values.{layer}.key
        while len(node.input) < 14:
            node.input.append("")
        for slot, kind, row in ((12, "key", 2 * layer), (13, "value", 2 * layer + 1)):
            name = f"ortllm_{kind}_scale.{layer}"
            graph.initializer.append(numpy_helper.from_array(scales[row][None, :, None, :], name))
            node.input[slot] = name
        keep = [
            a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
        ]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8


def _last_position_only(model: Any, ragged: bool = False) -> bytes | None:
    """The decoder with its LM head fed the last position only: a prompt chunk of N tokens then
    computes one row of logits instead of N (about 15% faster prefill on the default model, the same
    numbers). The weights stay in their external file; None when the graph is not the expected shape.
    `ragged`: each row's position comes from the input `ortllm_last_index` (rows × 1 × 1: right-padded
    rows end at different positions; rows × P × 1 gives P positions per row, as speculative decoding's
    verification wants). `model` (an onnx ModelProto without its weights) is changed in place."""
    try:
        from onnx import TensorProto, helper

        graph = model.graph
        heads = [n for n in graph.node if "logits" in n.output]
        output = next((o for o in graph.output if o.name == "logits"), None)
        if len(heads) != 1 or output is None or len(output.type.tensor_type.shape.dim) != 3:
            return None
        head = heads[0]
        if ragged:  # hidden[b, index[b, p], :] for each row b and each wanted position p
            graph.input.append(
                helper.make_tensor_value_info(
                    "ortllm_last_index", TensorProto.INT64, ["batch_size", "ortllm_positions", 1]
                )
            )
            graph.initializer.append(helper.make_tensor("ortllm_last_ones", TensorProto.INT64, [2], [1, 1]))
            graph.node.extend(
                [
                    helper.make_node("Shape", [head.input[0]], ["ortllm_last_h"], start=2),
                    helper.make_node(
                        "Concat", ["ortllm_last_ones", "ortllm_last_h"], ["ortllm_last_shape"], axis=0
                    ),
                    helper.make_node(
                        "Expand", ["ortllm_last_index", "ortllm_last_shape"], ["ortllm_last_at"]
                    ),
                    helper.make_node(
                        "GatherElements",
                        [head.input[0], "ortllm_last_at"],
                        ["ortllm_last_hidden"],
                        axis=1,
                        name="ortllm_last_position",
                    ),
                ]
            )
        else:
            for name, value in (
                ("ortllm_last_start", -1),
                ("ortllm_last_end", 2**62),
                ("ortllm_last_axis", 1),
            ):
                graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
            graph.node.append(
                helper.make_node(
                    "Slice",
                    [head.input[0], "ortllm_last_start", "ortllm_last_end", "ortllm_last_axis"],
                    ["ortllm_last_hidden"],
                    name="ortllm_last_position",
                )
            )
        head.input[0] = "ortllm_last_hidden"
        graph.node.remove(head)
        graph.node.append(head)  # after the Slice: nodes stay in topological order
        output.type.tensor_type.shape.dim[1].Clear()
        if ragged:
            output.type.tensor_type.shape.dim[1].dim_param = "ortllm_positions"
        else:
            output.type.tensor_type.shape.dim[1].dim_value = 1
        data = model.SerializeToString()
        return data if len(data) < 2**31 - 1 else None
    except Exception:  # the unmodified graph always works
        log.debug("keeping the decoder graph as it is", exc_info=True)
        return None


# ---- the batcher -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """A KV slot: the tokens whose keys and values it holds, and the request using it (if any)."""

    tokens: list[int] = field(default_factory=list)
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to feed (prompt, then the last sample)
    generated: int = 0
    # repeat_last_n -1 (the whole sequence): the distinct tokens seen, kept as they come
    history: set[int] = field(default_factory=set)
    history_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rng: np.random.Generator | None = None
    last_used: float = 0.0
    # the logits after the last prompt token: the same prompt again starts from them, bit for bit
    # (a prompt token fed alone computes slightly different numbers than inside a prompt chunk)
    prompt_logits: np.ndarray | None = None
    prompt_len: int = 0
    scope: str | None = None  # the cache scope of the request that computed `tokens` (see GenerationRequest)
    accept: float = SPEC_PRIOR  # running estimate of the chance that a drafted token is kept


class NativeBatcher:
    """Continuous batching over a NativeDecoder: a scheduler Backend, driven by its worker thread only.

    Slots 0..decoding-1 hold sequences that decode together; the rest are prefilling or free (a free
    slot keeps its tokens for prefix reuse). Sequences move by swapping slots' valid KV positions."""

    def __init__(self, decoder: NativeDecoder, eos_ids: list[int], speculation: str | None = None) -> None:
        """`speculation`: "ngram" (prompt lookup, the default) or "off"; None reads $ORTLLM_SPECULATION."""
        self.decoder = decoder
        self.eos_ids = list(eos_ids)
        self._eos = set(eos_ids)
        self.slots = [_Slot() for _ in range(decoder.slots)]
        self.decoding = 0
        self.reuse_prefixes = True  # False: every prompt is computed in full (tests comparing answers)
        # speculative decoding needs every position's logits from one pass (onnxruntime 1.32's query_seqlens)
        self.speculate = speculation_choice(speculation) == "ngram" and decoder.verifies

    # the scheduler's view
    @property
    def free(self) -> int:
        return sum(1 for s in self.slots if s.job is None)

    @property
    def busy(self) -> bool:
        return any(s.job is not None for s in self.slots)

    @property
    def wants_step(self) -> bool:
        """Work to do: sequences to step, or (idle) a grown arena to shrink."""
        return self.busy or self.decoder.capacity > self.decoder.initial_capacity

    @property
    def wake_at(self) -> float | None:
        return None

    @property
    def wants_warm_up(self) -> bool:
        """Idle, with cold KV slots among the first WARM_SLOTS (see KVArena.warm_up)."""
        return not self.busy and not bool(self.decoder.arena.warm[:WARM_SLOTS].all())

    def warm_up(self) -> None:
        """One small piece of warming (a few ms): the worker stays responsive."""
        self.decoder.arena.warm_up(WARM_SLOTS)

    def jobs(self) -> list[Job]:
        return [s.job for s in self.slots if s.job is not None]

    def takes(self, job: Job) -> bool:
        """Everything but sequences longer than the largest arena this machine allows (those go to
        og.Engine); constrained output too (a grammar's mask at each step, see runtime.constrain)."""
        return len(job.prompt_ids) + job.max_new <= self.decoder.max_capacity

    def admit(self, job: Job) -> bool:
        """Start `job` in the free slot sharing the longest prefix with its prompt; False when full."""
        free = [i for i in range(self.decoding, len(self.slots)) if self.slots[i].job is None]
        if not free:
            return False
        prompt = job.prompt_ids
        self.decoder.reserve(len(prompt) + 1, [len(s.tokens) for s in self.slots])
        scope = job.request.cache_scope
        shared = {
            i: _common_prefix(self.slots[i].tokens, prompt) if self._may_share(self.slots[i], scope) else 0
            for i in free
        }
        now = time.monotonic()

        warm = self.decoder.arena.warm

        def evict_order(i: int) -> tuple[int, float]:
            """Which free slot to overwrite first: a cache idle for KEEP_CACHE_S, then a fresh slot
            (a warm one first: the first use of a cold one pays its page faults), then the least
            recently used cache (a conversation someone may come back to)."""
            last = self.slots[i].last_used
            if last <= 0:
                return (1 if warm[i] else 2, 0.0)
            return (0 if now - last > KEEP_CACHE_S else 3, last)

        source = min(free, key=lambda i: (-shared[i], evict_order(i)))
        best, best_len = source, shared[source]
        if best_len == 0:
            best = min(free, key=evict_order)
        elif best_len < len(self.slots[source].tokens) // 2:
            # most of that slot's cache is another conversation: keep it, copy the shared prefix into
            # the slot that is cheapest to overwrite instead
            best = min(free, key=lambda i: (i == source, evict_order(i)))
            if best != source:
                self.decoder.arena.copy_prefix(source, best, best_len)
                target, origin = self.slots[best], self.slots[source]
                target.tokens = list(origin.tokens[:best_len])
                same = origin.prompt_len == best_len and origin.prompt_logits is not None
                target.prompt_logits, target.prompt_len = (
                    (origin.prompt_logits, best_len) if same else (None, 0)
                )
        slot = self.slots[best]
        if best_len == len(prompt) == slot.prompt_len and slot.prompt_logits is not None:
            reuse = len(prompt)  # the very same prompt: its first token comes from the kept logits
        else:
            reuse = min(best_len, len(prompt) - 1)  # at least one token is fed, for its logits
            slot.prompt_logits = None
        del slot.tokens[reuse:]
        slot.job = job
        slot.scope = scope
        slot.pending = list(prompt[reuse:])
        slot.generated = 0
        whole = job.options.repetition_penalty != 1.0 and job.options.repeat_last_n < 0
        slot.history = set(prompt) if whole else set()
        slot.history_array = np.fromiter(slot.history, dtype=np.int64, count=len(slot.history))
        slot.rng = np.random.default_rng(job.options.seed)
        slot.accept = SPEC_PRIOR
        job.cached_prompt_tokens = reuse
        job.started = time.monotonic()
        return True

    def step(self) -> None:
        """One round: drop cancelled jobs, feed one prompt chunk, then one decode step for all."""
        for i, slot in enumerate(self.slots):
            if slot.job is not None and slot.job.cancelled.is_set():
                self._release(i, "cancelled")
        if not self.busy:
            self._shrink()
            return
        prefilling = {
            i: job for i in range(self.decoding, len(self.slots)) if (job := self.slots[i].job) is not None
        }
        stepped = False  # whether the decoding rows rode along in the prefill pass
        if prefilling:
            budget = PREFILL_CHUNK if self.decoding else PREFILL_CHUNK_IDLE
            if self.decoder.ragged:
                stepped = self._prefill_rows(
                    sorted(prefilling, key=lambda i: prefilling[i].submitted), budget
                )
            else:
                first = min(prefilling, key=lambda i: prefilling[i].submitted)
                self._prefill(first, budget)
        if self.decoding and not stepped:
            self._decode()

    def close(self, reason: str = "cancelled") -> None:
        for i, slot in enumerate(self.slots):
            if slot.job is not None:
                self._release(i, reason)

    # ---- worker internals ----------------------------------------------------------------------

    def _share(self, i: int) -> None:
        """Before feeding slot i's next chunk: copy a longer computed prefix of its prompt from any other
        slot, busy ones included — concurrent requests with the same system prompt or document, or the
        same prompt twice, compute it once (a free slot's cache was already considered at admission)."""
        slot = self.slots[i]
        prompt = slot.tokens + slot.pending
        source, shared = i, len(slot.tokens)
        for j, other in enumerate(self.slots):
            if j != i and len(other.tokens) > shared and self._may_share(other, slot.scope):
                n = _common_prefix(other.tokens, prompt)
                if n > shared:
                    source, shared = j, n
        if source == i:
            return
        origin = self.slots[source]
        same = shared == len(prompt) == origin.prompt_len and origin.prompt_logits is not None
        n = shared if same else min(shared, len(prompt) - 1)  # at least one token is fed, for its logits
        if n <= len(slot.tokens):
            return
        self.decoder.arena.copy_prefix(source, i, n, start=len(slot.tokens))  # what slot i lacks
        slot.tokens, slot.pending = prompt[:n], prompt[n:]
        slot.prompt_logits, slot.prompt_len = (origin.prompt_logits, n) if same else (None, 0)
        assert slot.job is not None  # only a busy slot is fed
        slot.job.cached_prompt_tokens = n

    def _may_share(self, slot: _Slot, scope: str | None) -> bool:
        """Whether a request of `scope` may reuse what `slot` holds."""
        return self.reuse_prefixes and slot.scope == scope

    def _prefill(self, i: int, chunk: int) -> None:
        slot = self.slots[i]
        if slot.pending and self.reuse_prefixes:
            self._share(i)
        if slot.pending:
            ids = slot.pending[:chunk]
            try:
                logits = self.decoder.step(
                    np.asarray([ids], dtype=np.int64), np.asarray([len(slot.tokens)], dtype=np.int64), i
                )
            except Exception as exc:
                self._release(i, "error", f"generation failed: {first_line(exc)}")
                return
            slot.tokens.extend(ids)
            del slot.pending[: len(ids)]
            if slot.pending:
                return
            slot.prompt_logits, slot.prompt_len = logits[0].copy(), len(slot.tokens)
        assert slot.prompt_logits is not None
        # the prompt is in: its last logits give the first token; the slot joins the decoding rows
        self._move(i, self.decoding)
        self.decoding += 1
        self._emit(self.decoding - 1, slot.prompt_logits.copy())

    def _prefill_rows(self, order: list[int], budget: int) -> bool:
        """Chunks of the oldest prompts side by side in one pass, right-padded to the oldest's chunk: that
        is the step's budget shared by RAGGED_SPLIT rows, or less when the oldest prompt is nearly in, and
        then as many more rows as fit the budget (short prompts no longer take a pass each). Several
        rows use the cores better than one (NOTES.md lever 14). The decoding rows ride along when their
        padding is cheap (MERGE_PAD_TOKENS); True then."""
        chosen: list[_Slot] = []
        ready: list[_Slot] = []  # whole prompt copied from another slot, with its logits: nothing to feed
        new = budget
        for i in order:
            if len(chosen) >= budget // new:
                break
            slot = self.slots[i]
            if slot.pending and self.reuse_prefixes:
                self._share(i)
            if not slot.pending:
                ready.append(slot)
                continue
            prompt, held = slot.tokens + slot.pending, len(slot.tokens)
            overlap = max(
                (
                    _common_prefix(o.tokens + o.pending, prompt) - held
                    for o in chosen
                    if self._may_share(o, slot.scope)
                ),
                default=0,
            )
            if 2 * overlap >= len(slot.pending):
                continue  # mostly what a chosen row computes now: copied afterwards (_share), not computed twice
            if not chosen:  # the oldest prompt sets the chunk length
                split = RAGGED_SPLIT if len(order) > 1 else 1
                new = max(1, min(len(slot.pending), budget // split))
            chosen.append(slot)
        for slot in ready:
            self._promote(slot)
        if not chosen:
            return False
        counts = [min(len(s.pending), new) for s in chosen]
        new = max(counts)
        limit = self.decoder.max_capacity
        if max(len(s.tokens) for s in chosen) + new > limit:  # padding would overrun the largest arena
            chosen, counts = chosen[:1], [min(len(chosen[0].pending), budget)]
            new = counts[0]
        decoding = self.slots[: self.decoding]
        merge = bool(decoding) and len(decoding) * (new - 1) <= MERGE_PAD_TOKENS
        merge = merge and max(len(s.tokens) for s in decoding) + new <= limit
        for t, slot in enumerate(chosen):  # side by side after the decoding rows: one contiguous binding
            self._move(self._index(slot), self.decoding + t)
        rows = (decoding if merge else []) + chosen
        self.decoder.reserve(max(len(s.tokens) for s in rows) + new, [len(s.tokens) for s in self.slots])
        ids = np.zeros((len(rows), new), dtype=np.int64)
        valid = np.ones(len(rows), dtype=np.int64)
        base = len(rows) - len(chosen)
        for r, slot in enumerate(decoding if merge else []):
            ids[r, 0] = slot.pending[0]
        for r, (slot, n) in enumerate(zip(chosen, counts, strict=True), start=base):
            ids[r, :n] = slot.pending[:n]
            valid[r] = n
        lengths = np.asarray([len(s.tokens) for s in rows], dtype=np.int64)
        try:
            logits = self.decoder.step(ids, lengths, 0 if merge else self.decoding, valid)
        except Exception as exc:  # a failed pass fails the rows it held; the batcher keeps serving
            log.exception("native prefill pass failed")
            message = f"generation failed: {first_line(exc)}"
            for slot in chosen:
                self._release(self._index(slot), "error", message)
            for i in reversed(range(base)):
                self._release(i, "error", message)
            return merge
        done = []
        for r, (slot, n) in enumerate(zip(chosen, counts, strict=True), start=base):
            slot.tokens.extend(slot.pending[:n])
            del slot.pending[:n]
            if not slot.pending:
                slot.prompt_logits, slot.prompt_len = logits[r].copy(), len(slot.tokens)
                done.append(slot)
        if merge:
            for slot in decoding:
                slot.tokens.append(slot.pending.pop())
            for i in reversed(range(base)):  # from the last row down, as in _decode
                self._emit(i, logits[i])
        for slot in done:
            self._promote(slot)
        return merge

    def _index(self, slot: _Slot) -> int:
        return next(i for i, s in enumerate(self.slots) if s is slot)

    def _promote(self, slot: _Slot) -> None:
        """A prompt is in: its last logits give the first token; the slot joins the decoding rows."""
        assert slot.prompt_logits is not None
        self._move(self._index(slot), self.decoding)
        self.decoding += 1
        self._emit(self.decoding - 1, slot.prompt_logits.copy())

    def _decode(self) -> None:
        """One pass for the decoding rows: each row's last sampled token, and the tokens drafted after it
        (speculative decoding). Each fed position's logits are sampled in turn, exactly as one step per
        token would (penalties, grammar and seed included); a drafted token is kept while it equals the
        token sampled before it, and the first sample that differs is the row's next token."""
        rows = self.decoding
        slots = self.slots[:rows]
        drafts = self._drafts(slots)
        width = 1 + max(len(d) for d in drafts)
        longest = max(len(s.tokens) for s in slots) + width
        if longest > self.decoder.capacity:  # a sequence outgrows the arena: grow it (takes() bounds this)
            self.decoder.reserve(longest, [len(s.tokens) for s in self.slots])
        ids = np.zeros((rows, width), dtype=np.int64)
        counts = np.ones(rows, dtype=np.int64)
        for r, (s, draft) in enumerate(zip(slots, drafts, strict=True)):
            ids[r, 0] = s.pending[0]
            ids[r, 1 : 1 + len(draft)] = draft
            counts[r] = 1 + len(draft)
        lengths = np.asarray([len(s.tokens) for s in slots], dtype=np.int64)
        try:
            if width == 1:
                logits = self.decoder.step(ids, lengths, 0)[:, None, :]
            else:
                logits = self.decoder.step(ids, lengths, 0, counts, every=True)
        except Exception as exc:  # a failed step fails the rows it held; the batcher keeps serving
            log.exception("native decode step failed")
            for i in reversed(range(rows)):
                self._release(i, "error", f"generation failed: {first_line(exc)}")
            return
        for s in slots:
            s.tokens.append(s.pending.pop())
        # emit from the last row down: a finished row swaps with the last decoding row, never a visited one
        for i in reversed(range(rows)):
            slot, draft, job = slots[i], drafts[i], slots[i].job
            assert job is not None  # decoding rows are busy
            # counted before the request can end (its timings are final then)
            job.drafted_tokens += len(draft)
            self._emit(i, logits[i, 0])
            kept = 0
            for token in draft:  # the drafted tokens' keys and values are in: keep them while they agree
                if slot.job is None or slot.pending != [token]:
                    break
                slot.tokens.append(slot.pending.pop())
                kept += 1
                job.accepted_tokens += 1
                self._emit(i, logits[i, kept])
            if draft:
                slot.accept += 0.3 * ((1.0 if kept == len(draft) else kept / (kept + 1)) - slot.accept)

    def _drafts(self, slots: list[_Slot]) -> list[list[int]]:
        """Each row's drafted tokens (prompt lookup), as many as pay for their pass: the width with the most
        expected tokens per unit of cost, from each row's acceptance and SPEC_SLOPE. Empty lists when
        nothing is worth checking."""
        none: list[list[int]] = [[] for _ in slots]
        if not self.speculate or len(slots) > SPEC_MAX_ROWS:
            return none
        # every row of the pass is written whole, padding included: the longest row bounds the width
        limit = self.decoder.max_capacity - max(len(s.tokens) for s in slots) - 1
        drafts = []
        for s in slots:
            job = s.job
            assert job is not None  # decoding rows are busy
            room = min(SPEC_MAX_DRAFT, job.max_new - s.generated - 1, limit)
            drafts.append(lookup(s.tokens, s.pending[0], room) if room > 0 else [])
        if not any(drafts):
            return none
        rows = len(slots)
        best, best_rate = 1, float(rows)
        for width in range(2, 2 + max(len(d) for d in drafts)):
            kept = sum(
                sum(s.accept**j for j in range(1, 1 + min(width - 1, len(d))))
                for s, d in zip(slots, drafts, strict=True)
            )
            rate = (rows + kept) / (1.0 + SPEC_SLOPE * rows * (width - 1))
            if rate > best_rate:
                best, best_rate = width, rate
        if best == 1:  # not worth it now: hope returns slowly (a row that once failed would never draft)
            for s, d in zip(slots, drafts, strict=True):
                if d:
                    s.accept += 0.05 * (SPEC_PRIOR - s.accept)
            return none
        return [d[: best - 1] for d in drafts]

    def _emit(self, i: int, logits: np.ndarray) -> None:
        """Sample row i's next token and hand it over; end the sequence when it is done."""
        slot = self.slots[i]
        job = slot.job
        assert job is not None and slot.rng is not None  # only a busy slot is sampled
        options = job.options
        constraint = job.constraint
        try:
            n = options.repeat_last_n
            if options.repetition_penalty == 1.0 or n == 0:
                window = _NO_TOKENS
            elif n < 0:
                window = slot.history_array
            else:
                window = np.unique(np.asarray(slot.tokens[-n:], dtype=np.int64))
            penalised = options.presence_penalty or options.frequency_penalty
            output = np.asarray(job.token_ids, dtype=np.int64) if penalised else None
            allowed = constraint.allowed(logits.size) if constraint is not None else None
            if constraint is not None and allowed is not None and not allowed.any():
                self._release(i, "error", f"constrained output failed: {constraint.error or 'no token fits'}")
                return
            adjust(logits, options, window, slot.generated, self.eos_ids, output=output, allowed=allowed)
            token = pick(logits, options, slot.rng)
            logprob = job.logprob(logits, token) if job.request.logprobs is not None else None
        except Exception as exc:
            self._release(i, "error", f"sampling failed: {first_line(exc)}")
            return
        slot.generated += 1
        if token in self._eos:
            self._release(i, "stop")
            return
        if constraint is not None:
            constraint.advance(token)
        try:
            going = job.take(token, logprob=logprob) and not (constraint is not None and constraint.finished)
        except Exception as exc:  # one request's failure must not stop the others
            log.exception("request failed")
            self._release(i, "error", f"generation failed: {first_line(exc)}")
            return
        if not going:
            self._release(i, "stop")
            return
        if slot.generated >= job.max_new or len(slot.tokens) + 1 >= self.decoder.max_capacity:
            self._release(i, "length")
            return
        if job.cancelled.is_set():
            self._release(i, "cancelled")
            return
        slot.pending = [token]
        if options.repetition_penalty != 1.0 and options.repeat_last_n < 0 and token not in slot.history:
            slot.history.add(token)
            slot.history_array = np.append(slot.history_array, token)

    def _release(self, i: int, reason: str, error: str | None = None) -> None:
        """End slot i's job; the slot keeps its tokens (prefix reuse) and leaves the decoding rows."""
        slot = self.slots[i]
        job = slot.job
        slot.job = None
        slot.pending = []
        slot.last_used = time.monotonic()
        if i < self.decoding:
            self._move(i, self.decoding - 1)
            self.decoding -= 1
        if job is not None:
            job.finish(reason, error)

    def _shrink(self) -> None:
        """Idle after long sequences: back to the initial arena, cached prefixes cut to fit."""
        capacity = self.decoder.initial_capacity
        if self.decoder.capacity <= capacity:
            return
        for slot in self.slots:
            del slot.tokens[capacity:]
            if slot.prompt_len > len(slot.tokens):
                slot.prompt_logits, slot.prompt_len = None, 0
        self.decoder.resize(capacity, [len(s.tokens) for s in self.slots])

    def _move(self, a: int, b: int) -> None:
        """Swap slots a and b (their KV and their state)."""
        if a == b:
            return
        sa, sb = self.slots[a], self.slots[b]
        self.decoder.arena.swap(a, b, len(sa.tokens), len(sb.tokens))
        self.slots[a], self.slots[b] = sb, sa


def speculation_choice(value: str | None = None) -> str:
    """`value`, else `$ORTLLM_SPECULATION`: ngram (prompt lookup, the default) or off."""
    choice = (value if value is not None else os.environ.get("ORTLLM_SPECULATION", "")).strip().lower()
    choice = choice or "ngram"
    if choice not in ("ngram", "off"):
        raise ValueError(f"ORTLLM_SPECULATION must be ngram or off, not {choice!r}")
    return choice


def lookup(tokens: list[int], last: int, limit: int) -> list[int]:
    """Prompt lookup: up to `limit` tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (`tokens` then `last`; n from SPEC_NGRAMS, longest first); [] when there is none."""
    if limit <= 0:
        return []
    h = np.asarray(tokens[-SPEC_WINDOW:] + [last], dtype=np.int64)
    hits = np.flatnonzero(h[:-1] == last)
    if hits.size == 0:
        return []
    for n in SPEC_NGRAMS:
        if n >= h.size:
            continue
        ok = hits >= n - 1
        for k in range(1, n):
            ok &= h[np.maximum(hits - k, 0)] == h[-1 - k]
        if ok.any():
            p = int(hits[ok][-1])
            return [int(t) for t in h[p + 1 : p + 1 + limit]]
    return []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n])
    y = np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
