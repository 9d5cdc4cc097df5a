"""ortllm.toolcalls: tools validation, formats, prompt messages, grammars (on real tokenizers) and the streaming
output parser (scripted outputs split at every position)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jinja2
import pytest
from llguidance import LLMatcher, LLTokenizer

from ortllm.errors import InvalidOptions
from ortllm.toolcalls import (
    FORMATS,
    Delta,
    OutputParser,
    Tool,
    ToolChoice,
    detect_format,
    parse_tool_choice,
    parse_tools,
    prepare_messages,
    template_knows_tools,
    tool_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = parse_tools([WEATHER, TIME])
PARIS = '{"city": "Paris"}'
HERMES_CALL = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
MARKUP = (
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "<|tool_call|>",
    "<|python_tag|>",
    "<think>",
    "</think>",
)


# ------------------------------------------------------------------------------------------ the parser


def splits(text: str) -> list[list[str]]:
    """The same text fed whole, one character at a time, and in random chunks (three seeds)."""
    out = [[text], list(text)]
    for seed in range(3):
        rnd, pieces, i = random.Random(seed), [], 0
        while i < len(text):
            n = rnd.randint(1, 9)
            pieces.append(text[i : i + n])
            i += n
        out.append(pieces)
    return out


def parse(
    fmt: str, text: str, tools: list[Tool] | None = TOOLS, **kw: Any
) -> list[tuple[OutputParser, list[Delta]]]:
    """Parse `text` under every split; checks what must hold whatever the split, returns each result."""
    results = []
    for pieces in splits(text):
        parser = OutputParser(fmt, tools, **kw)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        assert "".join(d.text for d in deltas if d.kind == "content") == parser.content
        assert "".join(d.text for d in deltas if d.kind == "reasoning") == parser.reasoning
        args: dict[int, str] = {}
        for d in deltas:
            if d.kind != "tool_call":
                continue
            if d.index not in args:  # the first delta of a call names it, before any argument
                assert d.id and d.id.startswith("call_") and len(d.id) == 29 and d.name and d.text == ""
                args[d.index] = ""
            else:
                assert d.id is None and d.name is None
                args[d.index] += d.text
        assert sorted(args) == sorted([*range(len(parser.calls)), *parser.abandoned])
        assert [args[i] for i in sorted(args) if i not in parser.abandoned] == [
            c.arguments for c in parser.calls
        ]
        for call in parser.calls:
            assert isinstance(json.loads(call.arguments), dict)
        results.append((parser, deltas))
    # the split never changes the outcome
    first = results[0][0]
    for parser, _ in results[1:]:
        assert (parser.content, parser.reasoning) == (first.content, first.reasoning)
        assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in first.calls]
    return results


def outcome(
    fmt: str, text: str, tools: list[Tool] | None = TOOLS, **kw: Any
) -> tuple[str, str, list[tuple[str, Any]]]:
    parser = parse(fmt, text, tools, **kw)[0][0]
    return parser.content, parser.reasoning, [(c.name, json.loads(c.arguments)) for c in parser.calls]


def test_hermes_one_call() -> None:
    content, reasoning, calls = outcome("hermes", HERMES_CALL)
    assert (content, reasoning, calls) == ("", "", [("get_weather", {"city": "Paris"})])


def test_hermes_arguments_stream_exactly_as_generated() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Par\\u00eds", "n": [1, {"x": "}"}]}}\n</tool_call>'
    for parser, _ in parse("hermes", text):
        assert parser.calls[0].arguments == '{"city":"Par\\u00eds", "n": [1, {"x": "}"}]}'
    # one character at a time: the name arrives before any argument, the arguments in many pieces
    pieces = [d for d in parse("hermes", text)[1][1] if d.kind == "tool_call"]
    assert pieces[0].name == "get_weather" and len(pieces) > 10


def test_hermes_two_calls_and_text_before() -> None:
    content, _, calls = outcome("hermes", f"Let me check.\n{HERMES_CALL}\n{TIME_CALL}")
    assert content == "Let me check.\n"
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    indexes = {d.index for _, deltas in parse("hermes", f"{HERMES_CALL}\n{TIME_CALL}") for d in deltas}
    assert indexes == {0, 1}


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny, 21 °C.",
        "Use <b>bold</b> and a < b, or <tool_ (not a call).",
        "```python\nprint('hi')\n```",
        "{not json at all} said the model",
        "`x` is a variable",
    ],
)
def test_hermes_text_only(text: str) -> None:
    assert outcome("hermes", text) == (text, "", [])


def test_text_is_not_held_while_streaming() -> None:
    parser = OutputParser("hermes", TOOLS)
    assert [d.text for d in parser.feed("Paris is")] == ["Paris is"]
    assert parser.feed(" <tool_c") == [Delta("content", " ")]  # a possible opener waits
    assert parser.feed("ool>") == [Delta("content", "<tool_cool>")]


def test_fenced_json_answer_becomes_a_call() -> None:
    text = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    assert outcome("hermes", text) == ("", "", [("get_weather", {"city": "Paris"})])
    # the arguments may also come as a JSON string, and llama's key
    fenced = '```\n{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}\n```'
    assert outcome("hermes", fenced)[2] == [("get_weather", {"city": "Paris"})]


def test_bare_json_answer_becomes_a_call() -> None:
    text = '  {"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    assert outcome("hermes", text) == ("", "", [("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\nThat is the call.',
        '{"name": "unknown_tool", "arguments": {}}',
        '{"city": "Paris"}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Pa',
    ],
)
def test_json_that_is_not_a_whole_call_stays_content(text: str) -> None:
    assert outcome("hermes", text) == (text, "", [])


def test_json_followed_by_prose_is_released_before_the_end() -> None:
    parser = OutputParser("hermes", TOOLS)
    assert parser.feed('{"a": 1}') == []  # could still be the whole answer
    assert parser.feed(" and more") == [Delta("content", '{"a": 1} and more')]


@pytest.mark.parametrize(
    "cut",
    [
        "<tool_call>",
        "<tool_call>\n",
        '<tool_call>\n{"name": "get_wea',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}',
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>',
    ],
)
def test_cut_or_invalid_call_in_markup_is_dropped(cut: str) -> None:
    """A call in the model's markup that never completes (max_tokens) or is not valid reaches no field:
    markup never leaks into content."""
    text = f"{HERMES_CALL}\n{cut}"
    content, _, calls = outcome("hermes", text)
    assert calls == [("get_weather", {"city": "Paris"})]
    assert content.strip() == ""
    parser = OutputParser("hermes", TOOLS)
    parser.feed(text + "\nThe end.")
    parser.finish()
    assert cut.strip() in parser.dropped or parser.dropped.strip() in cut
    assert "<tool_call>" not in parser.content


def test_a_missing_closer_at_the_end_is_tolerated() -> None:
    assert outcome("hermes", HERMES_CALL.removesuffix("</tool_call>"))[2] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_no_tools_means_no_call_parsing() -> None:
    assert outcome("hermes", HERMES_CALL, tools=None) == (HERMES_CALL, "", [])


def test_mistral() -> None:
    text = f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]'
    assert outcome("mistral", text) == ("", "", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    after_text = 'Sure.[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'
    assert outcome("mistral", after_text) == ("Sure.", "", [("get_time", {})])


def test_phi4() -> None:
    text = f'<|tool_call|>[{{"name": "get_weather", "arguments": {PARIS}}}]<|/tool_call|>'
    assert outcome("phi4", text) == ("", "", [("get_weather", {"city": "Paris"})])


def test_llama3() -> None:
    bare = f'{{"name": "get_weather", "parameters": {PARIS}}}'
    assert outcome("llama3", bare) == ("", "", [("get_weather", {"city": "Paris"})])
    assert outcome("llama3", "<|python_tag|>" + bare)[2] == [("get_weather", {"city": "Paris"})]
    two = bare + ';{"name": "get_time", "parameters": {}}'
    assert outcome("llama3", two)[2] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert outcome("llama3", "It is sunny.") == ("It is sunny.", "", [])


def test_generic() -> None:
    calls = f'{{"tool_calls": [{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]}}'
    assert outcome("generic", calls) == ("", "", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    response = '{"response": "It is \\"sunny\\" in Paris \\u00e9\\ud83d\\ude00\\n."}'
    assert outcome("generic", response) == ('It is "sunny" in Paris é😀\n.', "", [])
    assert outcome("generic", "Plain words.") == ("Plain words.", "", [])
    # the response streams as it comes, not at the end
    parser = OutputParser("generic", TOOLS)
    assert parser.feed('{"response": "It is') == [Delta("content", "It is")]


def test_reasoning() -> None:
    text = f"<think>\nThe user wants the weather.\n</think>\n\n{HERMES_CALL}"
    assert outcome("hermes", text) == (
        "",
        "The user wants the weather.\n",
        [("get_weather", {"city": "Paris"})],
    )
    assert outcome("hermes", "<think>hmm</think>\n\nParis.", tools=None) == ("Paris.", "hmm", [])
    # the template opened <think> in the prompt: the output starts inside it
    assert outcome("hermes", "hmm, sunny\n</think>\n\nIt is sunny.", reasoning_open=True) == (
        "It is sunny.",
        "hmm, sunny\n",
        [],
    )
    # cut off while thinking: all of it is reasoning
    assert outcome("hermes", "<think>still going", tools=None) == ("", "still going", [])
    assert outcome("hermes", "<thinking> is a tag", tools=None) == ("<thinking> is a tag", "", [])


@pytest.mark.parametrize(
    "fmt,text",
    [
        ("hermes", f"Checking.\n{HERMES_CALL}\n{TIME_CALL}"),
        ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]'),
        ("phi4", '<|tool_call|>[{"name": "get_time", "arguments": {}}]<|/tool_call|>'),
        ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {}}'),
        ("hermes", "<think>x</think>ok"),
    ],
)
def test_markup_never_leaks_into_content(fmt: str, text: str) -> None:
    for _, deltas in parse(fmt, text):
        for d in deltas:
            assert not any(m in d.text for m in MARKUP), d


# ------------------------------------------------------------------------------------------ requests


def error(call: Any, *args: Any) -> InvalidOptions:
    with pytest.raises(InvalidOptions) as info:
        call(*args)
    return info.value


def test_parse_tools() -> None:
    assert TOOLS[1] == Tool("get_time", "", {"type": "object", "properties": {}}, False)
    assert parse_tools(None) == []


@pytest.mark.parametrize(
    "tools,param",
    [
        ({"x": 1}, "tools"),
        ([WEATHER, {"type": "retrieval"}], "tools[1].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
            "tools[0].function.parameters",
        ),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict"),
        ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tools"),
    ],
)
def test_parse_tools_errors(tools: Any, param: str) -> None:
    assert error(parse_tools, tools).param == param


def test_invalid_schema_message_names_the_problem() -> None:
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]
    assert "frobnicate" in str(error(parse_tools, bad))


def test_parse_tool_choice() -> None:
    assert parse_tool_choice(None, TOOLS) == ToolChoice("auto")
    assert parse_tool_choice(None, []) == ToolChoice("none")
    assert parse_tool_choice("required", TOOLS) == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert parse_tool_choice(named, TOOLS) == ToolChoice("function", "get_time")
    for bad, tools in [
        ({"type": "function", "function": {"name": "nope"}}, TOOLS),
        ("required", []),
        (named, []),
        ("sometimes", TOOLS),
        ({"type": "function"}, TOOLS),
    ]:
        assert error(parse_tool_choice, bad, tools).param == "tool_choice"


QWEN_LIKE = "{%- if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>{% endif %}"


def test_detect_format() -> None:
    assert detect_format(None) == detect_format("") == "generic"
    assert detect_format(QWEN_LIKE) == "hermes"
    assert detect_format("{{ '<tool_call>' }}{{ messages }}") == "generic"  # never reads tools
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == "mistral"
    phi4 = "{% if 'tools' in message %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}"
    assert detect_format(phi4) == "phi4"
    llama = "{%- if tools is not none %}<|start_header_id|>{{ t.parameters }}<|python_tag|>{% endif %}"
    assert detect_format(llama) == "llama3"
    assert not template_knows_tools("{{ 'the tools are described below' }}")


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 °C, sunny"},
]


def test_prepare_messages_for_a_tools_template() -> None:
    out = prepare_messages("hermes", HISTORY, TOOLS, True)
    assert out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[2] == {
        "role": "tool",
        "content": "21 °C, sunny",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }
    mistral = prepare_messages("mistral", HISTORY, TOOLS, True)
    assert (
        len(mistral[1]["tool_calls"][0]["id"]) == 9
        and mistral[2]["tool_call_id"] == mistral[1]["tool_calls"][0]["id"]
    )


def test_qwen_s_own_template_is_hermes_and_shows_the_call_and_its_result(qwen: Path) -> None:
    template = (qwen / "cpu-int4" / "chat_template.jinja").read_text()
    assert detect_format(template) == "hermes"
    tools = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in TOOLS]
    out = prepare_messages("hermes", HISTORY, TOOLS, True)
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=out, tools=tools, add_generation_prompt=True)
    )
    assert HERMES_CALL in text and "<tool_response>\n21 °C, sunny\n</tool_response>" in text


def test_prepare_messages_without_a_tools_template() -> None:
    out = prepare_messages("generic", [{"role": "system", "content": "Be brief."}, *HISTORY], TOOLS, False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"get_weather"' in out[0]["content"]
    assert '{"tool_calls": [{"name": ...' not in out[0]["content"] and '{"response": ' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    }
    assert out[3]["content"] == "Result of get_weather (call_1): 21 °C, sunny"
    assert prepare_messages("generic", HISTORY, TOOLS, False)[0]["role"] == "system"


@pytest.mark.parametrize(
    "messages,param",
    [
        ([HISTORY[0], {"role": "tool", "content": "x"}], "messages[1].tool_call_id"),
        (
            [HISTORY[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
            "messages[1].tool_call_id",
        ),
        (
            HISTORY[:1]
            + [{**HISTORY[1], "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}],
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            HISTORY[:1]
            + [{**HISTORY[1], "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}],
            "messages[1].tool_calls[0].function.arguments",
        ),
        (HISTORY[:1] + [{**HISTORY[1], "tool_calls": {"id": "c"}}], "messages[1].tool_calls"),
    ],
)
def test_prepare_messages_errors(messages: list[dict[str, Any]], param: str) -> None:
    for has_tools in (True, False):
        assert error(prepare_messages, "hermes", messages, TOOLS, has_tools).param == param


# ------------------------------------------------------------------------------------------ grammars


CHOICES = [ToolChoice("auto"), ToolChoice("required"), ToolChoice("function", "get_weather")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.mode)
@pytest.mark.parametrize("parallel", [True, False])
def test_every_grammar_compiles(fmt: str, choice: ToolChoice, parallel: bool) -> None:
    grammar = tool_grammar(fmt, TOOLS, choice, parallel)
    assert grammar is not None
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar)) == ""
    assert tool_grammar(fmt, TOOLS, ToolChoice("none"), parallel) is None


@pytest.fixture(scope="module")
def smol(pulled: Path) -> LLTokenizer:
    return LLTokenizer(str(pulled / "cpu-int4" / "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen: Path) -> LLTokenizer:
    """The tool-calling test model's tokenizer (the session's converted Qwen2.5-Coder, conftest.qwen)."""
    return LLTokenizer(str(qwen / "cpu-int4" / "tokenizer.json"))


def accepts(tok: LLTokenizer, grammar: str | None, text: str) -> bool:
    assert grammar is not None
    matcher = LLMatcher(tok, LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error(), matcher.get_error()
    ok = matcher.consume_tokens(tok.tokenize_str(text, parse_special=True))
    return bool(ok and matcher.is_accepting() and not matcher.is_error())


FENCED = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
EXAMPLES = {  # format: (one call, two calls, wrong name)
    "hermes": (HERMES_CALL, f"{HERMES_CALL}\n{TIME_CALL}", HERMES_CALL.replace("get_weather", "get_wether")),
    "mistral": (
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}]',
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]',
        f'[TOOL_CALLS][{{"name": "get_wether", "arguments": {PARIS}}}]',
    ),
    "phi4": (
        f'<|tool_call|>[{{"name": "get_weather", "arguments": {PARIS}}}]<|/tool_call|>',
        f'<|tool_call|>[{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]<|/tool_call|>',
        f'<|tool_call|>[{{"name": "get_wether", "arguments": {PARIS}}}]<|/tool_call|>',
    ),
    "llama3": (
        f'{{"name": "get_weather", "parameters": {PARIS}}}',
        f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}};{{"name": "get_time", "parameters": {{}}}}',
        f'{{"name": "get_wether", "parameters": {PARIS}}}',
    ),
    "generic": (
        f'{{"tool_calls": [{{"name": "get_weather", "arguments": {PARIS}}}]}}',
        f'{{"tool_calls": [{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {{}}}}]}}',
        f'{{"tool_calls": [{{"name": "get_wether", "arguments": {PARIS}}}]}}',
    ),
}
TEXT_ANSWER = {"generic": '{"response": "It is sunny."}'}


@pytest.mark.parametrize("fmt", FORMATS)
def test_grammars_enforce_the_choice(smol: LLTokenizer, fmt: str) -> None:
    one, two, wrong = EXAMPLES[fmt]
    text = TEXT_ANSWER.get(fmt, "It is sunny in Paris.")
    auto = tool_grammar(fmt, TOOLS, ToolChoice("auto"), True, tokenizer=smol)
    required = tool_grammar(fmt, TOOLS, ToolChoice("required"), True, tokenizer=smol)
    single = tool_grammar(fmt, TOOLS, ToolChoice("required"), False, tokenizer=smol)
    named = tool_grammar(fmt, TOOLS, ToolChoice("function", "get_time"), True, tokenizer=smol)
    assert accepts(smol, auto, one) and accepts(smol, auto, two) and accepts(smol, auto, text)
    assert not accepts(smol, auto, wrong)
    assert accepts(smol, required, one) and accepts(smol, required, two)
    assert not accepts(smol, required, text) and not accepts(smol, required, wrong)
    assert accepts(smol, single, one) and not accepts(smol, single, two)
    assert not accepts(smol, named, one)  # a call, but of another function
    if fmt == "mistral":
        assert accepts(smol, required, one.replace("[TOOL_CALLS][", "[TOOL_CALLS] ["))
    # the arguments follow the tool's schema: a missing required argument is refused
    assert not accepts(smol, required, one.replace(PARIS, "{}"))
    # what the parser reads back from an accepted answer is the call
    parsed = outcome(fmt, two)[2]
    assert parsed == [("get_weather", {"city": "Paris"}), ("get_time", {})]


OPENERS = {
    "hermes": "<tool_call>",
    "mistral": "[TOOL_CALLS]",
    "phi4": "<|tool_call|>",
    "llama3": "<|python_tag|>",
}


@pytest.mark.parametrize("fmt", list(OPENERS))
def test_auto_text_cannot_look_like_a_call(smol: LLTokenizer, fmt: str) -> None:
    """A fenced or bare JSON answer is a call, as constrained as one (what small models write instead of their
    markup); it is never free text."""
    auto = tool_grammar(fmt, TOOLS, ToolChoice("auto"), True, tokenizer=smol)
    key = "parameters" if fmt == "llama3" else "arguments"
    call = json.dumps({"name": "get_weather", key: {"city": "Paris"}})
    assert accepts(smol, auto, f"```json\n{call}\n```") and accepts(smol, auto, f"```xml\n{call}\n```")
    assert accepts(smol, auto, call)
    for fenced in ('```json\n{"foo": 1}\n```', '```xml\n{"foo": 1}\n```', '{"name": "nope"}'):
        assert not accepts(smol, auto, fenced)
    assert not accepts(smol, auto, call.replace("get_weather", "get_wether"))
    assert accepts(smol, auto, "```python\nprint('hi')\n```")
    assert not accepts(smol, auto, f"I will call {OPENERS[fmt]} now.")
    if fmt != "llama3":  # text, then calls, for formats with a distinctive opener
        assert accepts(smol, auto, "Let me check.\n" + EXAMPLES[fmt][0])


def test_qwen_special_tokens(qwen_tokenizer: LLTokenizer) -> None:
    """Qwen's <tool_call> is one token for llguidance: the grammar lets the model use it, text or calls."""
    auto = tool_grammar("hermes", TOOLS, ToolChoice("auto"), True, tokenizer=qwen_tokenizer)
    assert auto is not None and 'call: <tool_call> "\\n"' in auto
    for ok in (
        HERMES_CALL,
        "Let me check.\n" + HERMES_CALL,
        "Paris is sunny.",
        "```python\nx = 1\n```",
        FENCED,
    ):
        assert accepts(qwen_tokenizer, auto, ok), ok
    for bad in (
        FENCED.replace("get_weather", "x"),
        "Text <tool_call> inside",
        HERMES_CALL.replace("get_weather", "get_wether"),
    ):
        assert not accepts(qwen_tokenizer, auto, bad), bad
    # without the tokenizer the markup is plain text
    without = tool_grammar("hermes", TOOLS, ToolChoice("auto"), True)
    assert without is not None and '"<tool_call>"' in without


def test_tools_with_definitions(smol: LLTokenizer) -> None:
    """Pydantic-made schemas (LangChain, the Agents SDK) refer to "#/$defs/...": the refs still resolve."""
    unit = {"$defs": {"Unit": {"type": "string", "enum": ["C", "F"]}}}
    params = {
        "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/Unit"}},
        "required": ["unit"],
        **unit,
    }
    tools = parse_tools(
        [WEATHER, {"type": "function", "function": {"name": "set_unit", "parameters": params}}]
    )
    for fmt, call in [
        ("hermes", '<tool_call>\n{"name": "set_unit", "arguments": {"unit": "C"}}\n</tool_call>'),
        ("generic", '{"tool_calls": [{"name": "set_unit", "arguments": {"unit": "C"}}]}'),
    ]:
        grammar = tool_grammar(fmt, tools, ToolChoice("required"), True, tokenizer=smol)
        assert accepts(smol, grammar, call)
        assert not accepts(smol, grammar, call.replace('"C"', '"K"'))
