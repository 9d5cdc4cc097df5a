"""The one options validator: ranges, messages naming the field, defaults merging."""

import math

import pytest

from ortllm.errors import InvalidOptions
from ortllm.runtime.options import validate_options


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"temperature": 2.5}, "temperature must be between 0.0 and 2.0"),
        ({"temperature": -0.1}, "temperature must be between 0.0 and 2.0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p must be between 0.0 and 1.0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": True}, "max_tokens must be a number"),
        ({"repeat_penalty": -1}, "repeat_penalty must be >= 0"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"stop": [1]}, "stop must be a list of strings"),
        ({"seed": -3}, "seed must be between"),
    ],
)
def test_out_of_range_values_name_the_field(raw, message):
    with pytest.raises(InvalidOptions, match=message):
        validate_options(raw)


def test_request_overrides_model_defaults_and_none_is_ignored():
    opts = validate_options(
        {"temperature": 0, "top_p": None, "stop": "END"}, {"temperature": 0.7, "top_p": 0.5}
    )
    assert opts.temperature == 0.0 and opts.greedy
    assert opts.top_p == 0.5
    assert opts.stop == ("END",)


def test_max_tokens_limit():
    with pytest.raises(InvalidOptions, match="max_tokens must be at most 100"):
        validate_options({"max_tokens": 101}, max_tokens_limit=100)
