"""A model loaded for generation: variant and execution-provider choice, og.Model, tokenizer."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime_genai as og
import psutil

from ortllm.errors import ContextOverflow, ModelLoadError, first_line
from ortllm.store import InstalledModel, Variant

from . import templates
from .constrain import TokenTable

log = logging.getLogger("ortllm.runtime")

# which package brings each execution provider to onnxruntime-genai
EP_PACKAGES = {
    "cuda": "onnxruntime-genai-cuda (pip install 'ortllm[cuda]')",
    "dml": "onnxruntime-genai-directml on Windows (pip install 'ortllm[directml]') or onnxruntime-genai-winml",
    "webgpu": "an onnxruntime-genai build with WebGPU",
}
EP_PREFERENCE = ("cuda", "dml", "webgpu", "cpu")
# who batches requests: ortllm itself on CPU (native), og.Engine, or og.Generator one at a time
BATCHERS = ("auto", "native", "engine", "generator")
PRECISION_PREFERENCE = ("int4", "int8", "fp16", "bf16", "fp32")


def _precision_rank(precision: str) -> int:
    return (
        PRECISION_PREFERENCE.index(precision)
        if precision in PRECISION_PREFERENCE
        else len(PRECISION_PREFERENCE)
    )


@functools.cache
def ep_support() -> dict[str, str | None]:
    """Each GPU execution provider: None when it can run here, else why not (the build, or no device)."""
    checks = {"cuda": "is_cuda_available", "dml": "is_dml_available", "webgpu": "is_webgpu_available"}
    why: dict[str, str | None] = {}
    for ep, fn in checks.items():
        if not getattr(og, fn, lambda: False)():
            why[ep] = f"the installed onnxruntime-genai has no {ep}; it needs {EP_PACKAGES[ep]}"
        elif ep == "cuda" and not _loads("nvcuda.dll" if os.name == "nt" else "libcuda.so.1"):
            why[ep] = "no NVIDIA driver here (libcuda not found)"
        elif ep == "webgpu" and sys.platform.startswith("linux") and not _gpu_device():
            why[ep] = "no GPU device here (/dev/dri/renderD*, /dev/nvidia*)"
        else:
            why[ep] = None
    return why


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _gpu_device() -> bool:
    """Whether Linux shows a GPU that WebGPU (Vulkan) could use: a DRM render node or an NVIDIA device."""
    return any(Path("/dev/dri").glob("renderD*")) or any(Path("/dev").glob("nvidia[0-9]*"))


def available_eps() -> list[str]:
    """Execution providers that can run here: built into the installed onnxruntime-genai, with a device."""
    return [ep for ep, why in ep_support().items() if why is None] + ["cpu"]


def variant_ep(variant: Variant) -> str:
    """The EP a variant was built for, read from its genai_config.json (the manifest as fallback)."""
    try:
        cfg = json.loads((variant.path / "genai_config.json").read_text(encoding="utf-8"))
        providers = cfg["model"]["decoder"]["session_options"].get("provider_options", [])
    except (OSError, ValueError, KeyError):
        return variant.ep
    for entry in providers:
        for name in entry:
            return {"cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}.get(name.lower(), name.lower())
    return "cpu"


def variant_candidates(model: InstalledModel, force_ep: str | None = None) -> list[tuple[Variant, str]]:
    """Variants to try, best first, each with the reason it is chosen; never falls back from a forced EP."""
    variants = model.variants
    by_ep: dict[str, Variant] = {}
    # within one EP the lighter build runs first (int4 before fp32): it is the faster of equals
    for v in sorted(variants.values(), key=lambda v: _precision_rank(v.precision)):
        by_ep.setdefault(variant_ep(v), v)
    usable = available_eps()
    name = model.get("catalog_name") or model.name
    if force_ep:
        if force_ep not in by_ep:
            raise ModelLoadError(
                f"Model '{model.name}' has no {force_ep} variant (it has: {', '.join(sorted(variants))}); "
                f"build one with: ortllm convert {name} --ep {force_ep}"
            )
        if force_ep not in usable:
            raise ModelLoadError(
                f"The {force_ep} execution provider is not available in the installed onnxruntime-genai; "
                f"install {EP_PACKAGES.get(force_ep, force_ep)}"
            )
        return [(by_ep[force_ep], f"{force_ep} requested explicitly")]
    ranked = [ep for ep in EP_PREFERENCE if ep in by_ep and ep in usable]
    if not ranked:
        missing = sorted(by_ep)
        raise ModelLoadError(
            f"Model '{model.name}' was built for {', '.join(missing)}, which the installed onnxruntime-genai "
            f"cannot run (available: {', '.join(usable)}); install {EP_PACKAGES.get(missing[0], missing[0])} "
            f"or convert a cpu variant: ortllm convert {name} --ep cpu"
        )
    if len(by_ep) == 1:
        return [(by_ep[ranked[0]], f"the model was built for {ranked[0]}")]
    others = ", ".join(sorted(by_ep))
    return [(by_ep[ep], f"best available of the model's variants ({others})") for ep in ranked]


def choose_variant(model: InstalledModel, force_ep: str | None = None) -> tuple[Variant, str]:
    """The variant that would run first, and why (for listings and `ortllm doctor`)."""
    return variant_candidates(model, force_ep)[0]


def engine_supported() -> bool:
    """The 0.18 Engine API (requests with turns); 0.14's older Engine (add_request/step) does not count."""
    return hasattr(og, "Engine") and hasattr(og.Engine, "create_request") and hasattr(og, "TurnOptions")


def batcher_for(path: Path, ep: str, requested: str = "auto") -> tuple[str, str, Any]:
    """Who batches a variant's requests (native, engine or generator), why, and the decoder graph the native
    batcher takes (else None): the one decision `ortllm serve`, `chat` and `doctor` all report."""
    if requested in ("engine", "generator"):
        return requested, f"batcher {requested} requested", None
    from .backends.native import inspect_decoder

    genai_cfg = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))
    proto, why = inspect_decoder(path, genai_cfg, ep)
    if why is None:
        return "native", "ortllm batches it on plain onnxruntime", proto
    model_type = str(genai_cfg.get("model", {}).get("type", ""))
    if model_type in ENGINE_REFUSES:
        return "generator", f"{why}; og.Engine does not decode {model_type} models", None
    return ("engine" if engine_supported() else "generator"), why, None


# model types og.Engine 0.18 refuses ("Expected a decoder-only model"): og.Generator runs them
ENGINE_REFUSES = frozenset({"lfm2", "lfm2_moe"})


BATCHER_NAMES = {"native": "native batcher", "engine": "og.Engine", "generator": "og.Generator"}


def batcher_for_display(batcher: str, reason: str) -> str:
    """How listings say who batches: `native batcher`, or `og.Engine (why not native)`."""
    name = BATCHER_NAMES.get(batcher, batcher)
    return name if batcher in ("native", "onnxruntime") else f"{name} ({reason})"


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """`$name`, one of `choices` (the first when unset); ModelLoadError naming the variable otherwise."""
    choice = os.environ.get(name, "").strip().lower() or choices[0]
    if choice not in choices:
        raise ModelLoadError(f"{name} must be {' or '.join(choices)}, not {choice!r}")
    return choice


def kv_cache_choice() -> str:
    """`$ORTLLM_KV_CACHE`: float (default) or int8 (the native batcher only)."""
    return _env_choice("ORTLLM_KV_CACHE", ("float", "int8"))


def prefill_choice() -> str:
    """`$ORTLLM_PREFILL`: model (the model's own weights, default) or int8 (the native batcher only)."""
    return _env_choice("ORTLLM_PREFILL", ("model", "int8"))


def check_runtime_env() -> None:
    """Every ORTLLM_* runtime choice valid, else ModelLoadError naming the variable: the CLI checks them before
    a server, a chat or a bench starts, so a typo is one line, not a worker's traceback at the first load."""
    from .backends.native import speculation_choice

    kv_cache_choice()
    prefill_choice()
    try:
        speculation_choice()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if batcher_choice() not in BATCHERS:
        raise ModelLoadError(f"ORTLLM_BATCHER must be one of {', '.join(BATCHERS)}, not {batcher_choice()!r}")


def batcher_choice() -> str:
    """`$ORTLLM_BATCHER`: auto (default), native, engine or generator."""
    return os.environ.get("ORTLLM_BATCHER", "auto").strip().lower() or "auto"


def default_threads() -> int:
    """Intra-op threads for CPU decoding: `$ORTLLM_THREADS`, else the physical core count."""
    env = os.environ.get("ORTLLM_THREADS")
    if env:
        return max(1, int(env))
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass
class ModelInfo:
    """What a loaded model is, for listings and the `doctor`."""

    name: str
    variant: str
    ep: str
    reason: str
    context_length: int
    threads: int | None
    batcher: str  # who batches its requests: native, engine, generator (onnxruntime for embedding models)
    batcher_reason: str = ""  # why that batcher (why not native, when it is not)
    kv_cache: str = "float"  # int8: the native batcher keeps keys and values as int8 (ORTLLM_KV_CACHE)
    prefill: str = "model"  # int8: prompt chunks run on an int8 copy of the weights (ORTLLM_PREFILL)

    @property
    def runtime(self) -> str:
        """One line for logs and listings: `cpu-int4 on cpu, native batcher`."""
        kv = ", int8 KV cache" if self.kv_cache == "int8" else ""
        kv += ", int8 prefill" if self.prefill == "int8" else ""
        return f"{self.variant} on {self.ep}, {batcher_for_display(self.batcher, self.batcher_reason)}{kv}"


class LoadedModel:
    """An og.Model with its tokenizer, chat template and limits. Use it from one thread at a time."""

    def __init__(
        self,
        installed: InstalledModel,
        *,
        force_ep: str | None = None,
        threads: int | None = None,
        batcher: str = "auto",
    ) -> None:
        if batcher not in BATCHERS:
            raise ModelLoadError(f"Unknown batcher '{batcher}' (choose from {', '.join(BATCHERS)})")
        self.installed = installed
        self.name = installed.name
        self.batcher = batcher
        failures: list[str] = []
        for variant, reason in variant_candidates(installed, force_ep):
            try:
                self._load(variant, threads)
            except ModelLoadError as exc:
                if force_ep:
                    raise
                failures.append(str(exc))
                log.warning("%s; trying the next variant", exc)
                continue
            self.reason = reason + (f" (after: {'; '.join(failures)})" if failures else "")
            break
        else:
            raise ModelLoadError(failures[-1])
        genai_cfg = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))
        self.context_length = int(
            genai_cfg["model"].get("context_length") or installed.get("context_size") or 2048
        )
        self.eos_token_ids = _as_list(genai_cfg["model"].get("eos_token_id"))
        # sliding-window attention (Gemma 2/3): og.Engine and og.Generator refuse a KV cache below the window
        window = genai_cfg["model"].get("decoder", {}).get("sliding_window") or {}
        self.kv_floor = min(int(window.get("window_size") or 0), self.context_length)
        # the builder's include_hidden_states option adds a `hidden_states` output (recorded in the manifest)
        built_with = self.variant.info.get("extra_options", {})
        self.has_hidden_states = str(built_with.get("include_hidden_states", "")).lower() == "true"
        self._template = templates.model_template(self.path)
        self._special = self._special_tokens()
        self._bos = _leading_bos(self.path, genai_cfg)
        self.lock = threading.Lock()  # serialises tokenizer use between HTTP threads and the worker
        if self.native is not None:
            self._native_options()
        vocab = (
            self.native.vocab if self.native is not None else int(genai_cfg["model"].get("vocab_size") or 0)
        )
        # the vocabulary as llguidance sees it: constrained output and log-probabilities (built on first use)
        self.token_table = TokenTable(self.path / "tokenizer.json", vocab, self.eos_token_ids)
        log.info("loaded %s %s (%s)", self.name, self.info.runtime, self.reason)

    def _load(self, variant: Variant, threads: int | None) -> None:
        self.variant = variant
        self.ep = variant_ep(variant)
        self.path: Path = variant.path
        self.threads = (threads or default_threads()) if self.ep == "cpu" else None
        self._og_model: Any = None
        self.native: Any = None  # a NativeDecoder when ortllm batches this model itself (CPU)
        try:
            self._config = og.Config(str(self.path))
            if self.threads and hasattr(self._config, "overlay"):
                session = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
                self._config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            self.native = self._native_decoder()
            if self.native is None:
                self._og_model = og.Model(self._config)
                self.tokenizer = og.Tokenizer(self._og_model)
            else:  # og.Model (weights loaded a second time) only when a request needs og.Engine
                try:
                    self.tokenizer = og.Tokenizer(self._config)
                except TypeError:  # before 0.18 a tokenizer comes from a model only
                    self._og_model = og.Model(self._config)
                    self.tokenizer = og.Tokenizer(self._og_model)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise self._load_error(exc) from exc

    def _native_options(self) -> None:
        """ORTLLM_KV_CACHE=int8 and ORTLLM_PREFILL=int8: both calibrate on a short chat rendered with the model's
        own template (the KV cache's scales first: the prefill graph is derived from the final decoder)."""
        from .backends.native import KV_CALIBRATION

        calibration: list[int] = []
        for wanted, what, switch in (
            (kv_cache_choice(), "keep an int8 KV cache", self.native.quantize_kv),
            (prefill_choice(), "use the int8 prefill", self.native.enable_int8_prefill),
        ):
            if wanted != "int8":
                continue
            calibration = calibration or self.encode(self.render_chat(KV_CALIBRATION))
            try:
                switch(calibration)
            except ValueError as exc:
                raise ModelLoadError(f"Model '{self.name}' cannot {what}: {first_line(exc)}") from exc

    def _native_decoder(self) -> Any:
        self.batcher_used, self.batcher_reason, proto = batcher_for(self.path, self.ep, self.batcher)
        if self.batcher_used != "native":
            if self.batcher == "native":
                raise ModelLoadError(
                    f"Model '{self.name}' ({self.variant.id}) cannot use the native batcher: "
                    f"{self.batcher_reason}"
                )
            return None
        from .backends.native import NativeDecoder

        genai_cfg = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))
        return NativeDecoder(self.path, genai_cfg, threads=self.threads, proto=proto)

    def _load_error(self, exc: BaseException) -> ModelLoadError:
        hint = f"; install {EP_PACKAGES[self.ep]}" if self.ep in EP_PACKAGES else ""
        return ModelLoadError(
            f"Could not load model '{self.name}' ({self.variant.id} on {self.ep}): {first_line(exc)}{hint}"
        )

    @property
    def model(self) -> Any:
        """The og.Model, loaded on first use when the native batcher serves the model."""
        with self.lock:
            if self._og_model is None:
                if self.native is not None and hasattr(self._config, "overlay"):
                    # beside the native batcher (embeddings, constrained output) one thread: the pool
                    # threads of a second session spin after each run and slowed decode steps 1.7x
                    single = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
                    self._config.overlay(json.dumps({"model": {"decoder": {"session_options": single}}}))
                try:
                    self._og_model = og.Model(self._config)
                except Exception as exc:
                    raise self._load_error(exc) from exc
            return self._og_model

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            self.name,
            self.variant.id,
            self.ep,
            self.reason,
            self.context_length,
            self.threads,
            self.batcher_used,
            self.batcher_reason,
            "int8" if self.native is not None and self.native.dtype.__name__ == "int8" else "float",
            "int8" if self.native is not None and self.native.int8_prefill else "model",
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.installed.get("parameters") or {})

    def encode(self, text: str) -> list[int]:
        with self.lock:
            ids = [int(t) for t in self.tokenizer.encode(text)]
        if self._bos is not None and ids[:1] != [self._bos]:  # og's tokenizer never adds it itself
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: list[int]) -> str:
        import numpy as np

        with self.lock:
            return str(self.tokenizer.decode(np.asarray(ids, dtype=np.int32)))

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (jinja), if it ships one."""
        return self._template

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for chat messages (with tool calls and results) and the tools the template
        describes, using the model's own template where it has one."""
        keys = ("role", "content", "tool_calls", "tool_call_id", "name")
        clean = [{k: m[k] for k in keys if k in m} for m in messages]
        if self._template and hasattr(self.tokenizer, "apply_chat_template"):
            try:
                with self.lock:
                    if tools:
                        text = self.tokenizer.apply_chat_template(
                            json.dumps(clean), tools=json.dumps(tools), add_generation_prompt=True
                        )
                    else:
                        text = self.tokenizer.apply_chat_template(
                            json.dumps(clean), add_generation_prompt=True
                        )
                return str(text)
            except Exception:  # the runtime's template engine rejects some jinja features
                log.debug("runtime chat template failed for %s; rendering with jinja2", self.name)
        if self._template:
            return templates.render_jinja(self._template, clean, self._special, tools=tools)
        family = str(self.installed.get("template") or "none")
        return templates.render_jinja(
            templates.BUILTIN.get(family, templates.BUILTIN["none"]), clean, self._special
        )

    def check_fits(self, prompt_len: int, context: int | None = None) -> None:
        """A prompt must leave room for at least one generated token in `context` (default: the model's)."""
        context = context or self.context_length
        if prompt_len + 1 > context:
            raise ContextOverflow(f"Prompt too long for context window ({context} tokens)")

    def _special_tokens(self) -> dict[str, str]:
        cfg_path = self.path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        out = {}
        for key in ("bos_token", "eos_token"):
            value = cfg.get(key)
            out[key] = value.get("content", "") if isinstance(value, dict) else (value or "")
        return out


def _leading_bos(path: Path, genai_cfg: dict[str, Any]) -> int | None:
    """The BOS id every prompt must start with (tokenizer_config's add_bos_token, e.g. Gemma), else None."""
    cfg_path = path / "tokenizer_config.json"
    try:
        wants = json.loads(cfg_path.read_text(encoding="utf-8")).get("add_bos_token") is True
    except (OSError, ValueError):
        return None
    bos = genai_cfg["model"].get("bos_token_id")
    return int(bos) if wants and isinstance(bos, int) else None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
