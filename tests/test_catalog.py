"""The catalog has every model name the dialects' clients use, with aliases and complete entries."""

import pytest

from ortllm.catalog import load_catalog
from ortllm.errors import ModelNotFound

CLIENT_NAMES = [
    "smollm2-135m",
    "tinyllama-1.1b",
    "tiny-llama",
    "llama-3-8b",
    "llama-2-7b",
    "llama-2-7b-chat",
    "mistral-7b",
    "phi-2",
    "gemma-2b",
    "gemma-7b",
    "qwen2.5-0.5b",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "phi-3.5-mini",
    "microsoft/Phi-3.5-mini-instruct",
    "qwen-7b-chat",
    "qwen-14b-chat",
    "chatglm3-6b",
    "gpt-2",
    "falcon-7b",
    "all-minilm-l6-v2",
]


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_client_names_resolve(name):
    entry = load_catalog().get(name)
    assert entry.source and entry.family and entry.template and entry.context_size > 0
    assert entry.backend in ("genai", "optimum") and entry.kind in ("chat", "embedding")


def test_aliases_map_to_canonical_names():
    catalog = load_catalog()
    assert catalog.get("tiny-llama").name == "tinyllama-1.1b"
    assert catalog.get("gpt-2").name == "gpt-2" and catalog.get("gpt2").name == "gpt-2"
    assert catalog.get("LLAMA-2-7B").name == "llama-2-7b-chat"
    assert catalog.get("Qwen/Qwen2.5-0.5B-Instruct").name == "qwen2.5-0.5b"
    assert catalog.default == "smollm2-135m"


def test_architectures_the_builder_lacks_use_optimum():
    catalog = load_catalog()
    assert catalog.get("gpt-2").backend == "optimum"
    assert catalog.get("falcon-7b").backend == "optimum"
    assert catalog.get("all-minilm-l6-v2").kind == "embedding"


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelNotFound, match="Unknown model 'nope'.*smollm2-135m"):
        load_catalog().get("nope")
