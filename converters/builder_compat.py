"""Run onnxruntime-genai 0.18's model builder with the transformers 5 configs it cannot read translated.

Run as a module (`python -m ortllm.converters.builder_compat onnxruntime_genai.models.builder ARGS`): it
patches the builder's classes in this process only, then runs that builder module with ARGS.
"""

from __future__ import annotations

import runpy
from typing import Any

BUILDER = "onnxruntime_genai.models.builder"


def flatten_layer_type_rope(config: Any) -> None:
    """Gemma 3 under transformers 5: per-layer-type `rope_parameters` → the 4.x fields the builder reads.

    transformers 5 writes {"full_attention": {...}, "sliding_attention": {...}}; the builder expects a flat
    `rope_parameters` (global layers, with its `rope_type`), `rope_theta`, and `rope_local_base_freq` for the
    sliding-window layers.
    """
    rope = getattr(config, "rope_parameters", None)
    if not (isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict)):
        return
    full = {"rope_type": "default", **rope["full_attention"]}
    local = rope.get("sliding_attention") or full
    config.rope_parameters = full
    config.rope_theta = full.get("rope_theta", 10000.0)
    config.rope_local_base_freq = local.get("rope_theta", config.rope_theta)


def patch() -> None:
    """Install the translations on the builder classes that need them."""
    import onnxruntime_genai.models  # noqa: F401  # puts the builder's folder on sys.path, as builder.py expects

    # builder.py imports its classes as the top-level `builders` package: patch those very classes
    from builders.gemma import Gemma3Model  # type: ignore[import-not-found]

    original = Gemma3Model.__init__

    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        if type(self) is Gemma3Model:  # Gemma 4 subclasses it and reads the nested form itself
            flatten_layer_type_rope(config)
        original(self, config, *args, **kwargs)

    Gemma3Model.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    import sys

    module = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else BUILDER
    patch()
    sys.argv[0] = module
    runpy.run_module(module, run_name="__main__", alter_sys=True)
