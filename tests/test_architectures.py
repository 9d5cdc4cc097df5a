"""The architecture matrix: a tiny random-weight model of each family the genai builder dispatches on
converts with `ortllm convert` and greedy-decodes on the native batcher exactly as og.Generator does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import og_greedy, ortllm

pytestmark = [pytest.mark.model, pytest.mark.slow]

# small but not degenerate: 2 layers, grouped-query attention (4 query heads, 2 KV heads), a 16-token
# sliding window where the family has one, so the prompts below run past it; the vocabulary is SmolLM2's
COMMON: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}
WINDOW = 16
# architecture → (transformers config class, its extra fields)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": WINDOW}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16}),
    "Phi3ForCausalLM": ("Phi3Config", {"original_max_position_embeddings": 2048}),
    # partial rotary (factor 0.5): GQA's rotary cache needs (head_size / 4) to be a multiple of 8
    "PhiForCausalLM": ("PhiConfig", {"hidden_size": 128}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW}),
    "GraniteForCausalLM": ("GraniteConfig", {}),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "SmolLM3ForCausalLM": ("SmolLM3Config", {}),
    "NemotronForCausalLM": ("NemotronConfig", {"hidden_size": 128}),
    "Ernie4_5ForCausalLM": ("Ernie4_5Config", {}),
    "HunYuanDenseV1ForCausalLM": ("HunYuanDenseV1Config", {"head_dim": 16}),
    # attention-only Granite 4 (e.g. granite-4.0-micro); the Mamba layers of the hybrids cannot convert
    "GraniteMoeHybridForCausalLM": ("GraniteMoeHybridConfig", {"layer_types": ["attention"] * 2}),
    # LFM2's short-convolution layers beside attention, as the real models have them
    "Lfm2ForCausalLM": ("Lfm2Config", {"layer_types": ["conv", "full_attention"]}),
    "Lfm2MoeForCausalLM": (
        "Lfm2MoeConfig",
        {
            "layer_types": ["conv", "full_attention"],
            "num_dense_layers": 1,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
    ),
}
# families whose decoder graph the native batcher cannot run: og.Engine batches them (og.Generator where
# og.Engine refuses the model type), and `ortllm doctor` says why
ROUTED = {
    "HunYuanDenseV1ForCausalLM": ("engine", "decoder inputs differ from the builder's layout (position_ids)"),
    "Lfm2ForCausalLM": (
        "generator",
        "convolution states (short-conv layers), which the native batcher does not",
    ),
    "Lfm2MoeForCausalLM": ("generator", "og.Engine does not decode lfm2_moe models"),
}
SLIDING = {"MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}
TEXT_A = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field."
TEXT_B = "Water boils at one hundred degrees."
TOKENS = 8


def tiny_model(arch: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A seeded random-weight model of `arch` with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    import torch
    import transformers

    config_class, extra = FAMILIES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    getattr(transformers, arch)(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(pulled: Path) -> Path:
    return pulled / "cpu-int4"


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_converts_and_the_native_batcher_matches_og_generator(
    arch: str, tmp_path: Path, tokenizer_dir: Path
) -> None:
    import onnxruntime_genai as og

    from ortllm.runtime.backends import native
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.options import validate_options
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.runtime.types import GenerationRequest
    from ortllm.store import ModelStore

    name = "arch-" + arch.lower().removesuffix("forcausallm").replace("_", "-")
    source = tiny_model(arch, tmp_path / arch, tokenizer_dir)
    ortllm("convert", str(source), "--name", name, "--force", check=True, timeout=300)
    loaded = LoadedModel(ModelStore().get(name))  # auto: the native batcher unless the graph rules it out
    batcher, reason = ROUTED.get(arch, ("native", ""))
    assert loaded.info.batcher == batcher, (arch, loaded.info.batcher_reason)
    if reason:  # the reason reaches `ortllm doctor`
        doctor = json.loads(ortllm("doctor", "--json", check=True).stdout)
        entry = next(m for m in doctor["models"] if m["name"] == name)
        assert entry["batcher"] == batcher and reason in entry["runtime"], entry
    variant_dir = loaded.path
    genai = json.loads((variant_dir / "genai_config.json").read_text())
    if arch in SLIDING:  # the window reached the graph, and the prompts below run past it
        assert genai["model"]["decoder"]["sliding_window"]["window_size"] == WINDOW
    tokenizer = og.Tokenizer(og.Model(str(variant_dir)))
    a = [int(t) for t in tokenizer.encode(TEXT_A)]
    b = [int(t) for t in tokenizer.encode(TEXT_B)]
    c = a + [int(t) for t in tokenizer.encode(" Then it rains.")]  # shares all of a: a reused prefix
    assert len(a) > WINDOW > len(b)
    expected = {
        key: og_greedy(variant_dir, ids, TOKENS, loaded.kv_floor)
        for key, ids in (("a", a), ("b", b), ("c", c))
    }

    scheduler = Scheduler(loaded, batcher=batcher)
    try:
        assert isinstance(scheduler.backends[0], native.NativeBatcher) == (batcher == "native")

        def request(ids: list[int]) -> GenerationRequest:
            options = validate_options({"temperature": 0, "repeat_penalty": 1.0, "max_tokens": TOKENS})
            return GenerationRequest(options, prompt_tokens=ids)

        alone = scheduler.generate(request(a))
        assert alone.token_ids == expected["a"], "alone"
        if batcher == "native":  # forget the cached prompt: both rows compute theirs
            scheduler.backends[0].slots = [native._Slot() for _ in scheduler.backends[0].slots]
        first, second = scheduler.submit(request(b)), scheduler.submit(request(a))  # batched, two lengths
        got_b, got_a = first.result(), second.result()
        assert got_b.token_ids == expected["b"], "batched (shorter)"
        assert got_a.token_ids == expected["a"], "batched (longer)"
        reused = scheduler.generate(request(c))
        if batcher == "native":
            assert reused.usage.cached_prompt_tokens >= len(a) - 1, reused.usage
        assert reused.token_ids == expected["c"], "after a reused prefix"
    finally:
        scheduler.close()


# dispatched on by the builder, but not buildable from these configs: refused at convert time, in one line
REFUSED: dict[str, tuple[str, dict[str, Any], str]] = {
    "GraniteMoeHybridForCausalLM": (
        "GraniteMoeHybridConfig",
        {},  # transformers' default: Mamba layers (Granite 4 hybrids)
        "it builds attention layers only, and this model has 2 Mamba layers",
    ),
    "GptOssForCausalLM": (
        "GptOssConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        "it reads the original MXFP4 checkpoint, and these weights are dequantised",
    ),
}


@pytest.mark.parametrize("arch", list(REFUSED))
def test_family_the_builder_cannot_build_is_refused_in_one_line(arch: str, tmp_path: Path) -> None:
    import transformers

    config_class, extra, why = REFUSED[arch]
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    config.architectures = [arch]
    config.save_pretrained(tmp_path)  # the refusal reads config.json only: no weights needed
    proc = ortllm("convert", str(tmp_path), "--name", "refused", timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {arch} cannot be converted by the genai builder: {why}"], proc.stderr
    assert proc.stderr.rstrip().endswith(why)  # the last thing said, with no traceback after it
