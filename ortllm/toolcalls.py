"""Tool calling: OpenAI `tools` / `tool_choice` validation, each model family's tool-call convention
(detected from its chat template), the prompt messages its template expects, the llguidance grammar that
enforces `tool_choice`, and the streaming parser that turns generated text into content, reasoning and calls.

Formats: "hermes" (Qwen, Hermes: `<tool_call>\\n{json}\\n</tool_call>`), "llama3" (`{"name", "parameters"}`,
optionally after `<|python_tag|>`), "mistral" (`[TOOL_CALLS][{json}, ...]`), "phi4"
(`<|tool_call|>[{json}, ...]<|/tool_call|>`) and "generic" (templates without tools: the tools described in a
system message, the answer one JSON object `{"tool_calls": [...]}` or `{"response": "..."}`, as llama-server's
generic handler).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from llguidance import LLMatcher, LLTokenizer

from ortllm.errors import InvalidOptions

FORMATS = ("hermes", "llama3", "mistral", "phi4", "generic")
MAX_TOOLS = 128
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

# the markup each format opens (and closes) a list of calls with
_OPENER = {
    "hermes": "<tool_call>",
    "llama3": "<|python_tag|>",
    "mistral": "[TOOL_CALLS]",
    "phi4": "<|tool_call|>",
}
_CLOSER = {"hermes": "</tool_call>", "phi4": "<|/tool_call|>"}
_ARGS_KEY = {"llama3": "parameters"}  # every other format: "arguments"
MARKUP = tuple(sorted({*_OPENER.values(), *_CLOSER.values()}))
# whitespace the grammars allow inside a call's JSON: none beyond these separators, as templates render it
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Tool:
    """One OpenAI function tool, validated."""

    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI `tool_choice`: none, auto, required, or one named function."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


def parse_tools(raw: list[Any] | None) -> list[Tool]:
    """OpenAI `tools` as Tool objects; InvalidOptions naming the field at fault."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidOptions("tools must be a list of function tools", param="tools")
    if len(raw) > MAX_TOOLS:
        raise InvalidOptions(
            f"tools has {len(raw)} entries; at most {MAX_TOOLS} are supported", param="tools"
        )
    tools: list[Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise InvalidOptions(f"{where} must be an object", param=where)
        if item.get("type") != "function":
            raise InvalidOptions(
                f"{where}.type must be 'function' (got {item.get('type')!r}); only function tools are supported",
                param=f"{where}.type",
            )
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise InvalidOptions(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidOptions(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-' (got {name!r})",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise InvalidOptions(
                f"{where}.function.name {name!r} is used by two tools", param=f"{where}.function.name"
            )
        seen.add(name)
        description = fn.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise InvalidOptions(
                f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = dict(_EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise InvalidOptions(
                f"{where}.function.parameters must be a JSON Schema object",
                param=f"{where}.function.parameters",
            )
        problem = _schema_problem(parameters)
        if problem:
            raise InvalidOptions(
                f"{where}.function.parameters cannot be used: {problem}", param=f"{where}.function.parameters"
            )
        strict = fn.get("strict", False)
        if strict is None:
            strict = False
        if not isinstance(strict, bool):
            raise InvalidOptions(
                f"{where}.function.strict must be true or false", param=f"{where}.function.strict"
            )
        tools.append(Tool(name, description, parameters, strict))
    return tools


def _schema_problem(schema: dict[str, Any]) -> str:
    """Why llguidance cannot compile this JSON schema ("" when it can)."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except (ValueError, TypeError) as exc:
        return str(exc).strip()
    return " ".join(LLMatcher.validate_grammar(grammar).split())


def parse_tool_choice(raw: Any, tools: list[Tool]) -> ToolChoice:
    """OpenAI `tool_choice` checked against the request's tools."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tools:
            raise InvalidOptions(
                "tool_choice 'required' needs at least one tool in tools", param="tool_choice"
            )
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidOptions("tool_choice.function.name must name one of the tools", param="tool_choice")
        if name not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "none were given"
            raise InvalidOptions(
                f"tool_choice names the function {name!r}, which is not in tools ({known})",
                param="tool_choice",
            )
        return ToolChoice("function", name)
    raise InvalidOptions(
        'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# ---------------------------------------------------------------------------------------------- templates


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template reads `tools` (a variable, or a message's "tools" key as Phi-4-mini's does)."""
    if not template:
        return False
    try:
        import jinja2
        from jinja2 import nodes

        ast = jinja2.Environment().parse(template)
    except Exception:  # templates with extensions plain jinja cannot parse: look at their tags' text
        blocks = re.findall(r"\{[{%](.*?)[%}]\}", template, re.S)
        code = [re.sub(r"'[^']*'|\"[^\"]*\"", "", b) for b in blocks]
        return any(re.search(r"\btools\b", c) for c in code)
    for node in ast.find_all((nodes.Name, nodes.Getattr, nodes.Const)):
        if isinstance(node, nodes.Name) and node.name == "tools":
            return True
        if isinstance(node, nodes.Getattr) and node.attr == "tools":
            return True
        if isinstance(node, nodes.Const) and node.value == "tools":
            return True
    return False


def detect_format(template: str | None) -> str:
    """The tool-call convention a chat template teaches its model, "generic" when it knows no tools."""
    if not template or not template_knows_tools(template):
        return "generic"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|tool_call|>" in template or "<|tool|>" in template:
        return "phi4"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3"
    return "generic"


def _text_of(content: Any) -> str:
    """A message's content as text (OpenAI text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def _mistral_id(call_id: str) -> str:
    """Mistral's templates insist on 9 alphanumeric characters for a call id."""
    if re.fullmatch(r"[a-zA-Z0-9]{9}", call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def generic_system_prompt(tools: list[Tool]) -> str:
    """The system text that teaches a model without a tools template the generic convention."""
    described = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False
        )
        for t in tools
    )
    return (
        "You can call these tools (functions); each is described as JSON with its JSON Schema parameters:\n"
        f"{described}\n\n"
        "Answer with exactly one JSON object and nothing else: either "
        '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments>}}]} to call one or more tools, '
        'or {"response": "<your answer>"} to answer the user directly.'
    )


def _generic_calls_text(calls: list[dict[str, Any]]) -> str:
    body = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    return json.dumps({"tool_calls": body}, ensure_ascii=False)


def prepare_messages(
    fmt: str, messages: list[dict[str, Any]], tools: list[Tool], template_has_tools: bool
) -> list[dict[str, Any]]:
    """OpenAI chat messages as the model's chat template expects them (tool calls and results included)."""
    names: dict[str, str] = {}  # call id -> function name, from earlier assistant messages
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidOptions(f"{where} must be an object", param=where)
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            calls = _assistant_calls(msg["tool_calls"], where, names)
            content = _text_of(msg.get("content"))
            if not template_has_tools:
                text = _generic_calls_text(calls)
                out.append({"role": "assistant", "content": f"{content}\n\n{text}" if content else text})
                continue
            if fmt == "mistral":
                calls = [{**c, "id": _mistral_id(c["id"])} for c in calls]
            new = {**msg, "content": content, "tool_calls": calls}
            if fmt == "phi4":  # Phi-4-mini's template renders content only: the calls go there, in its markup
                listed = [
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls
                ]
                new["content"] = (
                    content + "<|tool_call|>" + json.dumps(listed, ensure_ascii=False) + "<|/tool_call|>"
                )
            out.append(new)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidOptions(
                    f"{where} is a tool message without tool_call_id (the id of the call it answers)",
                    param=f"{where}.tool_call_id",
                )
            if call_id not in names:
                raise InvalidOptions(
                    f"{where}.tool_call_id {call_id!r} matches no tool call of an earlier assistant message",
                    param=f"{where}.tool_call_id",
                )
            content = _text_of(msg.get("content"))
            if not template_has_tools:
                line = f"Result of {names[call_id]} ({call_id}): {content}"
                if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                    out[-1]["content"] += "\n" + line
                else:
                    out.append({"role": "user", "content": line, "_results": True})
                continue
            tool_id = _mistral_id(call_id) if fmt == "mistral" else call_id
            out.append({"role": "tool", "content": content, "tool_call_id": tool_id, "name": names[call_id]})
        else:
            out.append(dict(msg))
    for m in out:
        m.pop("_results", None)
    if tools and not template_has_tools:
        prompt = generic_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{_text_of(out[0].get('content'))}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    elif tools and fmt == "phi4":  # Phi-4-mini reads the tools from its system message
        described = json.dumps(
            [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools],
            ensure_ascii=False,
        )
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "tools": described}
        else:
            out.insert(0, {"role": "system", "content": "", "tools": described})
    return out


def _assistant_calls(raw: Any, where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    """An assistant message's OpenAI tool_calls as Hugging Face templates take them (arguments a dict)."""
    if not isinstance(raw, list):
        raise InvalidOptions(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise InvalidOptions(f"{at}.function must be an object", param=f"{at}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidOptions(f"{at}.function.name must be a string", param=f"{at}.function.name")
        arguments = fn.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise InvalidOptions(
                    f"{at}.function.arguments is not valid JSON: {exc}", param=f"{at}.function.arguments"
                ) from exc
        if not isinstance(arguments, dict):
            raise InvalidOptions(
                f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments"
            )
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = _new_id()
        names[call_id] = name
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


# ---------------------------------------------------------------------------------------------- grammars


def special_markup(tokenizer: LLTokenizer) -> frozenset[str]:
    """The tool-call markup strings that are single special tokens for llguidance in this tokenizer."""
    found = set()
    for text in MARKUP:
        ids = tokenizer.tokenize_str(text, parse_special=True)
        if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
            found.add(text)
    return frozenset(found)


def _rx(text: str) -> str:
    """`text` escaped for a regex inside an llguidance /.../ terminal (Rust regex syntax)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)


def _markup(text: str, special: frozenset[str]) -> str:
    """A Lark item for a piece of markup: the special token where the tokenizer has one, else a literal."""
    return text if text in special else json.dumps(text)


def _call_schema(tools: list[Tool], key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """JSON schema of one call (name first: the parser relies on it, then the arguments), and the tools'
    definitions, which must sit at the root of the grammar's schema for their "#/$defs/..." references."""
    options, defs = [], {}
    for t in tools:
        parameters, own = _hoist_defs(t.name, _closed(t.parameters))
        defs.update(own)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, key: parameters},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    return (options[0] if len(options) == 1 else {"anyOf": options}), defs


def _closed(node: Any) -> Any:
    """A schema whose objects with declared properties take no others unless they say so: a function gets
    the arguments it declares (measured: Qwen2.5-Coder-0.5B otherwise invents a "city2" beside "city")."""
    if isinstance(node, list):
        return [_closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) if k not in ("const", "enum", "default", "examples") else v for k, v in node.items()}
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _hoist_defs(tool: str, schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool's schema without its $defs / definitions, which come back renamed for the root."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not own:
        return schema, {}
    rename = {
        f"#/{where}/{name}": f"#/$defs/{tool}.{name}" for where in ("$defs", "definitions") for name in own
    }

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: rename.get(v, v) if k == "$ref" and isinstance(v, str) else fix(v) for k, v in node.items()
            }
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    body = fix({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
    return body, {f"{tool}.{name}": fix(value) for name, value in own.items()}


def tool_grammar(
    fmt: str,
    tools: list[Tool],
    choice: ToolChoice,
    parallel: bool,
    *,
    tokenizer: LLTokenizer | None = None,
) -> str | None:
    """A Lark grammar (llguidance) for the whole answer that enforces `choice`; None for "none".

    `tokenizer` (the model's, as llguidance sees it) lets markup that is a special token there be written as
    that token; without it markup is plain text."""
    if choice.mode == "none" or not tools:
        return None
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}")
    if choice.mode == "function":
        tools = [t for t in tools if t.name == choice.name]
        if not tools:
            raise InvalidOptions(f"tool_choice names the function {choice.name!r}, which is not in tools")
        parallel = False
    special = special_markup(tokenizer) if tokenizer is not None else frozenset()
    key = _ARGS_KEY.get(fmt, "arguments")
    schema, defs = _call_schema(tools, key)
    root = {"$defs": defs} if defs else {}
    if fmt == "generic":
        return _generic_grammar(schema, choice, parallel, root)
    lines = [f"call_json: %json {json.dumps({**schema, **root, 'x-guidance': _JSON_STYLE})}"]
    opener = _markup(_OPENER[fmt], special)
    if fmt == "hermes":
        closer = _markup(_CLOSER[fmt], special)
        lines.append(f'call: {opener} "\\n" call_json "\\n" {closer}')
        more = ' ("\\n" call)*' if parallel else ""
        lines.append(f'rest: "\\n" call_json "\\n" {closer}{more}')  # what follows the first opener
    elif fmt in ("mistral", "phi4"):
        closer = " " + _markup(_CLOSER[fmt], special) if fmt in _CLOSER else ""
        items = 'call_json (", " call_json)*' if parallel else "call_json"
        bracket = '("[" | " [")' if fmt == "mistral" else '"["'  # Mistral's template writes "[TOOL_CALLS] ["
        lines.append(f'rest: {bracket} {items} "]"{closer}')
    else:  # llama3: a bare JSON call, optionally after <|python_tag|>; parallel calls separated by ";"
        items = 'call_json (";" call_json)*' if parallel else "call_json"
        lines.append(f"calls: {opener}? {items}")
    if fmt != "llama3":
        lines.append(f"calls: {opener} rest")
    if choice.mode != "auto":
        start = "calls"
    elif fmt == "llama3":
        start = "TEXT | calls"
    elif _OPENER[fmt] in special:  # a special token ends the text lexeme by itself
        start = "TEXT | calls | TEXT calls"
    else:  # a literal opener: text up to its first occurrence, lazily, as the lexer is greedy
        start = "TEXT | calls | before rest"
        lines.append(f"before[lazy]: /(?s:.)+{_rx(_OPENER[fmt])}/ & ~/{_looks_like_call(fmt)}/")
    if choice.mode == "auto":
        lines.append(_text_terminal(fmt))
        # what small models write instead of their own markup (Qwen2.5-Coder-0.5B: a ```json or ```xml
        # fence around the call, or the bare JSON): a call too, and as constrained as one
        start += " | FENCE call_json FENCE_END"
        lines += [r"FENCE: /```[A-Za-z0-9_+\-]*[ \t]*\n/", r"FENCE_END: /\n?```/"]
        if fmt != "llama3":  # (llama3's calls are bare JSON already)
            start += " | call_json"
    return "\n".join([f"start: {start}", *lines]) + "\n"


def _looks_like_call(fmt: str) -> str:
    """A regex for text that starts like a call: JSON, a fenced JSON block, the format's opener."""
    fence = r"```[A-Za-z0-9_+\-]*[ \t]*\r?\n[ \t\r\n]*\{"  # a fenced block (any language) holding JSON
    return rf"[ \t\r\n]*(\{{|(?i:```[ \t]*json)|```[ \t\r\n]*\{{|{fence}|{_rx(_OPENER[fmt])})(?s:.)*"


def prose_grammar(fmt: str) -> str:
    """tool_choice "none": the answer is prose — it starts with a letter, a digit, a quote or Markdown (never
    with JSON, a bracket or a code fence, the shapes of a call) and never holds the format's opener; code may
    follow later. Measured on Qwen2.5-Coder-0.5B: told of no tool it still answers a tool result with the
    call's JSON again, or with a code block; held to prose it answers from the result."""
    opener = _rx(_OPENER.get(fmt, "<tool_call>"))
    return f"start: TEXT\nTEXT: /[\\p{{L}}\\p{{N}}\"'*_#-](?s:.)*/ & ~/(?s:.)*{opener}(?s:.)*/\n"


def _text_terminal(fmt: str) -> str:
    """A text answer: not empty, not starting like a call, never containing the opener (code fences in other
    languages stay possible)."""
    opener = _rx(_OPENER[fmt])
    return f"TEXT: /(?s:.)+/ & ~/{_looks_like_call(fmt)}/ & ~/(?s:.)*{opener}(?s:.)*/"


def _generic_grammar(call: dict[str, Any], choice: ToolChoice, parallel: bool, root: dict[str, Any]) -> str:
    """The generic format: the whole answer one JSON object, calls or (auto) a response."""
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    with_calls = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    options = [with_calls]
    if choice.mode == "auto":
        options.append(
            {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return f"start: answer\nanswer: %json {json.dumps({**schema, **root, 'x-guidance': _JSON_STYLE})}\n"


# ---------------------------------------------------------------------------------------------- output


@dataclass
class ToolCall:
    """One complete call from the model's output; `arguments` a JSON string (OpenAI's wire form)."""

    id: str
    name: str
    arguments: str


@dataclass
class Delta:
    """One piece of parsed output, in order."""

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""  # content / reasoning text, or a piece of a call's arguments
    index: int = 0  # tool_call: the call's index
    id: str | None = None  # tool_call: on the call's first delta only
    name: str | None = None  # tool_call: on the call's first delta only


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


_WS = " \t\r\n"
_THINK, _UNTHINK = "<think>", "</think>"
# a fenced block of any language holding JSON (Qwen2.5-Coder-0.5B writes ```xml around its calls), and what
# may still become one: held back at the start of an answer until decided
_FENCE_START = re.compile(r"```[A-Za-z0-9_+\-]*[ \t]*\r?\n[ \t\r\n]*\{", re.I)
_FENCE_PREFIX = re.compile(r"`{1,2}|```[A-Za-z0-9_+\-]*[ \t]*(\r?\n[ \t\r\n]*)?", re.I)


class _Fail(Exception):
    """The text being read as a call is not one."""


@dataclass
class _Call:
    """The call being read: where it is, what has streamed."""

    index: int
    id: str = ""
    name: str = ""
    args: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    step: str = "open"  # open, name_key, name, args_key, args, close
    started: bool = field(default=False)


class OutputParser:
    """Generated text (streamed in any pieces) as content, reasoning and tool calls, per a tool-call format."""

    def __init__(self, fmt: str, tools: list[Tool] | None, *, reasoning_open: bool = False) -> None:
        self.fmt = fmt if fmt in FORMATS else "generic"
        self._names = {t.name for t in tools or []}
        self.calls: list[ToolCall] = []
        # indexes of calls whose first deltas streamed but that never completed (cut off, or invalid): their
        # text is content now; a streaming client has seen their start
        self.abandoned: list[int] = []
        self.dropped = ""  # call markup that never completed (cut off by max_tokens, or invalid): in no field
        self.content = ""
        self.reasoning = ""
        self._buf = ""  # text received and not yet decided
        self._region = ""  # markup and call text consumed since the last complete call (content if it fails)
        self._state = "think" if reasoning_open else "start"
        self._list_end = "list_closer"  # where a JSON list of calls goes once it ends
        self._call: _Call | None = None
        self._next_index = 0
        self._strip = reasoning_open  # drop whitespace that opens reasoning / the answer after it
        self._out: list[Delta] = []
        self._final = False
        self._done = False

    # -- public

    def feed(self, text: str) -> list[Delta]:
        """Parse a piece of generated text; returns the deltas now certain."""
        if self._done:
            raise RuntimeError("feed after finish")
        self._buf += text
        self._run()
        return self._flush()

    def finish(self) -> list[Delta]:
        """End of output: decide what was held back (an incomplete call becomes content)."""
        if self._done:
            return []
        self._final = True
        self._run()
        if self._buf or self._region:  # whatever is left could not be a complete call
            left = self._region + self._buf
            if self._markup_call(left):  # a call in the model's markup, cut short (max_tokens): not content
                self.dropped += left
            else:
                self._emit("content", left)
            self._region = self._buf = ""
        self._done = True
        return self._flush()

    # -- output

    def _emit(self, kind: Literal["content", "reasoning"], text: str) -> None:
        if not text:
            return
        if kind == "content":
            self.content += text
        else:
            self.reasoning += text
        self._out.append(Delta(kind, text))

    def _emit_call(self, call: _Call, piece: str = "", first: bool = False) -> None:
        if first:
            self._out.append(Delta("tool_call", "", call.index, call.id, call.name))
        elif piece:
            self._out.append(Delta("tool_call", piece, call.index))

    def _flush(self) -> list[Delta]:
        merged: list[Delta] = []
        for d in self._out:
            last = merged[-1] if merged else None
            if (
                last is not None
                and last.kind == d.kind
                and d.id is None
                and (d.kind != "tool_call" or (last.index == d.index and last.id is None))
            ):
                last.text += d.text
            else:
                merged.append(d)
        self._out = []
        return merged

    # -- the state machine: each step consumes from _buf and says whether it made progress

    def _run(self) -> None:
        while True:
            before = (self._state, len(self._buf), self._call.step if self._call else "")
            try:
                getattr(self, "_s_" + self._state)()
            except _Fail:
                self._fail()
            if before == (self._state, len(self._buf), self._call.step if self._call else ""):
                return

    def _take(self, n: int) -> str:
        """Consume n characters of _buf as markup (kept in _region until the call completes)."""
        taken, self._buf = self._buf[:n], self._buf[n:]
        self._region += taken
        return taken

    def _fail(self) -> None:
        """What was read as a call is not one: it is content, and reading goes on as text."""
        if self._call is not None and self._call.started:
            self.abandoned.append(self._call.index)
        markup = self._markup_call(self._region)
        if markup:  # tool-call markup never reaches content: the broken call is skipped to its closer
            self.dropped += self._region
        else:
            self._emit("content", self._region)
        self._region = ""
        self._call = None
        self._state = "skip" if markup else "text"

    def _s_skip(self) -> None:
        """The rest of a broken call in the model's markup, up to its closer (to the end without one)."""
        closer = _CLOSER.get(self.fmt)
        end = self._buf.find(closer) if closer else -1
        if end < 0:
            keep = _held(self._buf, [closer]) if closer else 0
            self.dropped += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep :]
            return
        self.dropped += self._buf[: end + len(closer or "")]
        self._buf = self._buf[end + len(closer or "") :]
        self._state = "between"

    def _markup_call(self, text: str) -> bool:
        """Whether `text` opens a call with the format's own markup."""
        opener = _OPENER.get(self.fmt)
        return bool(opener) and text.lstrip(_WS).startswith(opener or "\0")

    def _s_start(self) -> None:
        rest = self._buf.lstrip(_WS)
        if not self._final and (not rest or (_THINK.startswith(rest) and rest != _THINK)):
            return  # might still open with <think>
        if rest.startswith(_THINK):
            self._buf = rest[len(_THINK) :]
            self._state, self._strip = "think", True
        else:
            self._state = "answer"

    def _s_think(self) -> None:
        if self._strip:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return
            self._strip = False
        at = self._buf.find(_UNTHINK)
        if at >= 0:
            self._emit("reasoning", self._buf[:at])
            self._buf = self._buf[at + len(_UNTHINK) :]
            self._state, self._strip = "answer", True
            return
        keep = 0 if self._final else _held(self._buf, (_UNTHINK,))
        self._emit("reasoning", self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]

    def _s_answer(self) -> None:
        """The start of the answer: a call, a fenced or bare JSON call, or text."""
        if self._strip:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf and not self._final:
                return
            self._strip = False
        if not self._names:
            self._state = "text"
            return
        rest = self._buf.lstrip(_WS)
        if not rest and not self._final:
            return
        opener = _OPENER.get(self.fmt)
        if opener and rest.startswith(opener):
            self._buf = rest
            self._take(len(opener))
            self._open_calls()
            return
        if rest.startswith("{") and self.fmt in ("llama3", "generic"):
            self._buf = rest
            self._state = "llama3_calls" if self.fmt == "llama3" else "generic"
            self._call = None
            return
        if rest.startswith("{") or _FENCE_START.match(rest):
            self._state = "fallback"
            return
        if not self._final and ((opener and opener.startswith(rest)) or _FENCE_PREFIX.fullmatch(rest)):
            return  # still undecided
        self._state = "text"

    def _s_text(self) -> None:
        markers = [_THINK, _UNTHINK]
        opener = _OPENER.get(self.fmt) if self._names else None
        if opener and self.fmt != "generic":
            markers.append(opener)
        hits = [(self._buf.find(m), m) for m in markers]
        found = [(at, m) for at, m in hits if at >= 0]
        if found:
            at, marker = min(found)
            self._emit("content", self._buf[:at])
            self._buf = self._buf[at:]
            if marker == opener:
                self._take(len(marker))
                self._open_calls()
            else:
                self._buf = self._buf[len(marker) :]
                if marker == _THINK:
                    self._state, self._strip = "think", True
            return
        keep = 0 if self._final else _held(self._buf, markers)
        self._emit("content", self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]

    def _open_calls(self) -> None:
        """After the format's opener: the calls it introduces."""
        self._call = None
        self._list_end = "list_closer"
        self._state = {"hermes": "hermes_call", "llama3": "llama3_calls"}.get(self.fmt, "list_open")

    # hermes: <tool_call>\n{json}\n</tool_call>, repeated

    def _s_hermes_call(self) -> None:
        if self._read_call():
            self._state = "hermes_close"

    def _s_hermes_close(self) -> None:
        if self._lit(_CLOSER["hermes"], optional_at_end=True):
            self._complete_call()
            self._state = "between"

    def _s_between(self) -> None:
        """After a list of calls: another opener, or text."""
        rest = self._buf.lstrip(_WS)
        opener = _OPENER[self.fmt] if self.fmt in _OPENER else ""
        if not rest and not self._final:
            return
        if opener and rest.startswith(opener):
            self._buf = rest
            self._take(len(opener))
            self._open_calls()
        elif opener and opener.startswith(rest) and rest and not self._final:
            return
        else:
            self._buf = rest
            self._state = "text"

    # mistral / phi4: [ {json}, {json} ] (phi4 then its closer)

    def _s_list_open(self) -> None:
        rest = self._buf.lstrip(_WS)
        if not rest:
            if self._final:
                raise _Fail
            return
        if rest.startswith("["):
            self._take(len(self._buf) - len(rest) + 1)
            self._state = "list_item"
        elif rest.startswith("{"):  # a single call without the list
            self._state = "single_item"
        else:
            raise _Fail

    def _s_single_item(self) -> None:
        if self._read_call():
            self._complete_call()
            self._state = "list_closer"

    def _s_list_item(self) -> None:
        if self._read_call():
            self._complete_call()
            self._state = "list_sep"

    def _s_list_sep(self) -> None:
        rest = self._buf.lstrip(_WS)
        if not rest:
            if self._final:
                raise _Fail
            return
        self._take(len(self._buf) - len(rest) + 1)
        if rest[0] == ",":
            self._state = "list_item"
        elif rest[0] == "]":
            self._state = self._list_end
        else:
            raise _Fail

    def _s_list_closer(self) -> None:
        closer = _CLOSER.get(self.fmt)
        if closer is None or self._lit(closer, optional_at_end=True):
            self._region = ""
            self._state = "between"

    # llama3: {json} (; {json})*

    def _s_llama3_calls(self) -> None:
        if self._read_call():
            self._complete_call()
            self._state = "llama3_sep"

    def _s_llama3_sep(self) -> None:
        rest = self._buf.lstrip(_WS)
        if not rest and not self._final:
            return
        if rest.startswith(";"):
            self._take(len(self._buf) - len(rest) + 1)
            self._state = "llama3_calls"
        else:
            self._state = "between"

    # generic: {"tool_calls": [...]} / {"tool_call": {...}} / {"response": "..."}

    def _s_generic(self) -> None:
        m = re.match(r'\{[ \t\r\n]*"(tool_calls|tool_call|response)"[ \t\r\n]*:[ \t\r\n]*', self._buf)
        if m is None:
            if self._final or not re.fullmatch(
                r'\{[ \t\r\n]*("[a-z_]*("[ \t\r\n]*(:[ \t\r\n]*)?)?)?', self._buf
            ):
                self._state = "text"  # not the convention: the answer is plain content
            return
        self._take(m.end())
        self._state = {
            "tool_calls": "generic_list",
            "tool_call": "generic_one",
            "response": "generic_response",
        }[m.group(1)]

    def _s_generic_list(self) -> None:
        if self._lit("["):
            self._state, self._list_end = "list_item", "generic_end"

    def _s_generic_one(self) -> None:
        if self._read_call():
            self._complete_call()
            self._state = "generic_end"

    def _s_generic_response(self) -> None:
        self._region = ""  # decided: an answer, streamed as content
        self._buf = self._buf.lstrip(_WS)
        if not self._buf.startswith('"'):
            if self._buf.strip(_WS) or self._final:
                raise _Fail
            self._buf = ""
            return
        text, end, closed = _json_string(self._buf)
        self._emit("content", text)
        if closed:
            self._buf = self._buf[end:]
            self._state = "generic_end"
        elif self._final:  # cut off inside the answer: what came is the content
            self._buf = ""
            self._state = "text"
        elif end > 1:
            self._buf = '"' + self._buf[end:]

    def _s_generic_end(self) -> None:
        if self._lit("}", optional_at_end=True):
            self._region = ""
            self._state = "between"

    # the fallbacks: an unconstrained answer that is one fenced or bare JSON call

    def _s_fallback(self) -> None:
        text = self._buf.strip(_WS)
        if self._final:
            calls = _lenient_calls(text, self._names)
            if calls is None:
                self._state = "text"
                return
            for name, args in calls:
                call = _Call(self._next_index, _new_id(), name, args)
                self._next_index += 1
                self._emit_call(call, first=True)
                self._emit_call(call, args)
                self.calls.append(ToolCall(call.id, name, args))
            self._buf = ""
            self._state = "text"
            return
        if not _could_be_whole_call(text):
            self._state = "text"

    # -- pieces

    def _lit(self, literal: str, optional_at_end: bool = False) -> bool:
        """Consume whitespace and `literal`; False while undecided; _Fail when something else is there."""
        rest = self._buf.lstrip(_WS)
        if rest.startswith(literal):
            self._take(len(self._buf) - len(rest) + len(literal))
            return True
        if self._final:
            if optional_at_end and not rest:
                return True
            raise _Fail
        if literal.startswith(rest):
            return False
        raise _Fail

    def _read_call(self) -> bool:
        """Read one `{"name": ..., "arguments": {...}}` object, streaming it; True once it is complete."""
        if self._call is None:
            self._call = _Call(-1)
        call = self._call
        while True:
            if call.step == "open":
                if not self._lit("{"):
                    return False
                call.step = "name_key"
            elif call.step == "name_key":
                m = re.match(r'[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*', self._buf)
                if m is None or m.end() == len(self._buf):
                    if self._final or not re.fullmatch(
                        r'[ \t\r\n]*("(n(a(m(e("[ \t\r\n]*(:[ \t\r\n]*)?)?)?)?)?)?)?', self._buf
                    ):
                        raise _Fail
                    return False
                self._take(m.end())
                call.step = "name"
            elif call.step == "name":
                if not self._buf.startswith('"'):
                    raise _Fail
                name, end, closed = _json_string(self._buf)
                if not closed:
                    if self._final:
                        raise _Fail
                    return False
                if name not in self._names:
                    raise _Fail
                self._take(end)
                call.name, call.id, call.index = name, _new_id(), self._next_index
                self._next_index += 1
                call.started = True
                self._emit_call(call, first=True)
                call.step = "args_key"
            elif call.step == "args_key":
                m = re.match(r'[ \t\r\n]*,[ \t\r\n]*"(arguments|parameters)"[ \t\r\n]*:[ \t\r\n]*', self._buf)
                if m is None or m.end() == len(self._buf):
                    if self._final or not re.fullmatch(
                        r'[ \t\r\n]*(,[ \t\r\n]*("[a-z]*("[ \t\r\n]*(:[ \t\r\n]*)?)?)?)?', self._buf
                    ):
                        raise _Fail
                    return False
                self._take(m.end())
                call.step = "args"
            elif call.step == "args":
                if not call.args and not self._buf:
                    if self._final:
                        raise _Fail
                    return False
                if not call.args and not self._buf.startswith("{"):
                    raise _Fail
                n = _scan_json(call, self._buf)
                piece = self._take(n)
                call.args += piece
                self._emit_call(call, piece)
                if call.depth > 0 or not call.args:
                    if self._final:
                        raise _Fail
                    return False
                try:
                    json.loads(call.args)
                except ValueError as exc:
                    raise _Fail from exc
                call.step = "close"
            elif call.step == "close":
                return self._lit("}")
            else:  # pragma: no cover
                raise AssertionError(call.step)

    def _complete_call(self) -> None:
        call = self._call
        assert call is not None and call.step == "close"
        self.calls.append(ToolCall(call.id, call.name, call.args))
        self._call = None
        self._region = ""


def _held(text: str, markers: Iterable[str]) -> int:
    """How many trailing characters of `text` could begin one of `markers` (held back until decided)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def _scan_json(call: _Call, text: str) -> int:
    """How many characters of `text` belong to the JSON value being read (stops where it closes)."""
    for i, c in enumerate(text):
        if call.in_string:
            if call.escaped:
                call.escaped = False
            elif c == "\\":
                call.escaped = True
            elif c == '"':
                call.in_string = False
        elif c == '"':
            call.in_string = True
        elif c in "{[":
            call.depth += 1
        elif c in "}]":
            call.depth -= 1
            if call.depth == 0:
                return i + 1
    return len(text)


def _json_string(text: str) -> tuple[str, int, bool]:
    """A JSON string at the start of `text` (which opens with its quote): (the text decoded so far, the index
    after it, whether the string is complete). An escape cut in half waits for the rest."""
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return _loads_string(text[: i + 1]), i + 1, True
        if c == "\\":
            n = 6 if text[i + 1 : i + 2] == "u" else 2
            if n == 6 and re.fullmatch(r"[dD][89abAB][0-9a-fA-F]{2}", text[i + 2 : i + 6]):
                n = 12 if text[i + 6 : i + 8] in ("\\u", "\\", "") else 6  # a surrogate pair's first half
            if i + n > len(text):
                break
            i += n
            continue
        i += 1
    return _loads_string(text[:i] + '"'), i, False


def _loads_string(literal: str) -> str:
    try:
        value = json.loads(literal)
    except ValueError as exc:
        raise _Fail from exc
    return str(value)


def _could_be_whole_call(text: str) -> bool:
    """While streaming: can this held answer start still be one fenced or bare JSON object and nothing else?"""
    if text.startswith("```"):
        body = text.split("\n", 1)[1] if "\n" in text else ""
        close = body.find("```")
        return close < 0 or not body[close + 3 :].strip()
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return True
    return not text[end:].strip()


def _lenient_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """The calls in a whole answer that is one fenced or bare JSON call (or list of calls); None if it is not."""
    m = re.fullmatch(r"```[A-Za-z0-9_+\-]*[ \t]*\r?\n(.*?)\r?\n?[ \t]*```", text, re.S | re.I)
    body = m.group(1) if m else text
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    elif isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
        value = value["tool_call"]
    items = value if isinstance(value, list) and value else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict) or set(item) - {"name", "arguments", "parameters", "type", "id"}:
            return None
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class ToolPlan:
    """A chat with tools, planned for one model: what its template reads, the grammar that enforces the
    choice, and a parser per answer. Every dialect with tools (OpenAI, Ollama, Responses, Messages) plans
    through `plan()`."""

    format: str  # the model's tool-call convention (FORMATS)
    messages: list[dict[str, Any]]  # as the model's template reads them
    tools: list[dict[str, Any]] | None  # what the template describes (None: the messages describe them)
    guidance: tuple[str, str] | None  # ("lark_grammar", grammar) enforcing tool_choice (None: unconstrained)
    offered: list[Tool]  # the tools the answer may call

    def parser(self) -> OutputParser:
        """A parser of one answer (each choice of a request gets its own)."""
        return OutputParser(self.format, self.offered or None)


def plan(
    template: str | None,
    messages: list[dict[str, Any]],
    tools: list[Any] | None,
    tool_choice: Any = None,
    *,
    parallel: bool = True,
    tokenizer: LLTokenizer | None = None,
) -> ToolPlan:
    """How a chat with OpenAI-shaped `tools` and messages (tool calls, tool results) runs on a model with chat
    `template`; `tokenizer` (llguidance's view of the model's) writes markup that is a special token as that
    token. 400 (InvalidOptions naming the field) for bad tools, choices and histories."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    fmt = detect_format(template)
    knows = template_knows_tools(template)
    offered = parsed if choice.mode != "none" else []  # "none": the model is not told of any tool
    prepared = prepare_messages(fmt, messages, offered, knows)
    if offered:
        grammar = tool_grammar(fmt, offered, choice, parallel, tokenizer=tokenizer)
    else:  # "none" with tools given: a text answer that cannot pass for a call
        grammar = prose_grammar(fmt) if parsed else None
    shown = [_tool_dict(t) for t in offered] if offered and knows else None
    return ToolPlan(fmt, prepared, shown, ("lark_grammar", grammar) if grammar else None, offered)


def _tool_dict(tool: Tool) -> dict[str, Any]:
    """A tool in OpenAI's shape, as chat templates read it."""
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}
