"""Tool calling on a real model: accuracy with and without enforcement, and the speed of constrained requests.

1. accuracy: CASES (prompts across several tools, and prompts that need no tool) with tool_choice "auto",
   greedy, each answer parsed as the server parses it; once with the grammar that enforces the choice
   (what ortllm does) and once without it (the model's own output, parsed leniently). Reports: right tool,
   arguments valid against the tool's schema, no call where none is needed, and overall accuracy.
2. throughput: C concurrent constrained requests (a JSON schema, as `response_format` sends it) on the
   native batcher (grammar masks in ortllm's own sampler) and on og.Engine (onnxruntime-genai's guidance),
   the same model loaded twice: aggregate generated tokens per second.

    python benchmarks/tools.py --model qwen2.5-coder-0.5b [--json out.json] [--phases accuracy,throughput]

Runs in-process on the models of $ORTLLM_HOME; nothing goes over the network.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from ortllm.runtime.loaded import LoadedModel
from ortllm.runtime.options import validate_options
from ortllm.runtime.scheduler import Scheduler
from ortllm.runtime.types import GenerationRequest
from ortllm.store import ModelStore


def fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


S = {"type": "string"}
TOOLS = [
    fn(
        "get_weather",
        "Current weather in a city",
        {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    fn("get_time", "Current local time in a city", {"city": S}, ["city"]),
    fn(
        "convert_currency",
        "Convert an amount of money from one currency to another",
        {"amount": {"type": "number"}, "from_currency": S, "to_currency": S},
        ["amount", "from_currency", "to_currency"],
    ),
    fn("send_email", "Send an email", {"to": S, "subject": S, "body": S}, ["to", "subject", "body"]),
    fn("search_web", "Search the web for recent information", {"query": S}, ["query"]),
    fn("calculate", "Evaluate an arithmetic expression", {"expression": S}, ["expression"]),
]


@dataclass(frozen=True)
class Case:
    prompt: str
    tool: str | None  # the tool a good answer calls (None: answer in text, no call)
    key: str | None = None  # an argument whose value must contain `value` (case-insensitive)
    value: str | None = None


CASES = [
    Case("What is the weather in Paris?", "get_weather", "city", "paris"),
    Case("Is it raining in London right now?", "get_weather", "city", "london"),
    Case("How hot is it in Tokyo today, in fahrenheit?", "get_weather", "city", "tokyo"),
    Case("Tell me the current temperature in Berlin.", "get_weather", "city", "berlin"),
    Case("Weather forecast for Madrid please", "get_weather", "city", "madrid"),
    Case("What time is it in New York?", "get_time", "city", "new york"),
    Case("Tell me the local time in Sydney.", "get_time", "city", "sydney"),
    Case("What's the time in Cairo at the moment?", "get_time", "city", "cairo"),
    Case("Convert 100 US dollars to euros.", "convert_currency", "to_currency", "e"),
    Case("How many Japanese yen is 50 British pounds?", "convert_currency", "from_currency", ""),
    Case("Exchange 20 euros into Swiss francs.", "convert_currency", "from_currency", ""),
    Case("Please convert 3000 INR to USD.", "convert_currency", "to_currency", "usd"),
    Case(
        "Send an email to bob@example.com saying the meeting moved to 3pm.",
        "send_email",
        "to",
        "bob@example.com",
    ),
    Case(
        "Email alice@example.org with subject 'Report' and tell her it is done.", "send_email", "to", "alice@"
    ),
    Case(
        "Write an email to team@corp.com to announce Friday's release.", "send_email", "to", "team@corp.com"
    ),
    Case("Search the web for the latest Python release.", "search_web", "query", "python"),
    Case("Look up recent news about the Mars rover.", "search_web", "query", "mars"),
    Case("Find information online about the 2026 World Cup.", "search_web", "query", "world cup"),
    Case("Who won yesterday's football match? Search for it.", "search_web", "query", ""),
    Case("Calculate 1234 * 5678.", "calculate", "expression", "1234"),
    Case("What is 17 squared plus 3? Use the calculator.", "calculate", "expression", "17"),
    Case("Compute (45 + 55) / 4.", "calculate", "expression", "45"),
    Case("Evaluate 2 to the power of 16.", "calculate", "expression", "2"),
    Case("Do I need an umbrella in Seattle today?", "get_weather", "city", "seattle"),
    Case("Hello! How are you?", None),
    Case("Write a haiku about autumn leaves.", None),
    Case("What is the capital of France?", None),
    Case("Explain what a Python list comprehension is.", None),
    Case("Write a Python function that reverses a string.", None),
    Case("Translate 'good morning' into Spanish.", None),
    Case("What does HTTP stand for?", None),
    Case("Give me three names for a pet goldfish.", None),
    Case("Thank you, that is all.", None),
    Case("Summarise in one sentence: the cat sat on the mat all day.", None),
]


def attempted(text: str) -> bool:
    """Whether a text answer is a call attempt the parser could not use (JSON naming something, alone or in
    a code fence): not a text answer either."""
    head = text.lstrip()
    return head.startswith(("{", "```json", "```xml", "<tool_call>")) and '"name"' in head[:200]


def judge(case: Case, calls: list[Any], text: str) -> dict[str, bool]:
    """Whether the answer is right: the expected tool with schema-valid arguments, or a text answer (no call,
    no broken call attempt)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    valid = True
    for call in calls:
        try:
            args = json.loads(call.arguments)
            jsonschema_rs.validate(schemas[call.name], args)
        except (ValueError, KeyError, jsonschema_rs.ValidationError):
            valid = False
    broken = not calls and attempted(text)
    if case.tool is None:
        return {"called": bool(calls), "right": not calls and not broken, "valid": valid, "broken": broken}
    first = calls[0] if calls else None
    right = first is not None and first.name == case.tool
    if right and first is not None and case.key:
        try:
            got = str(json.loads(first.arguments).get(case.key, "")).lower()
        except ValueError:
            got = ""
        right = case.value in got if case.value else bool(got)
    return {"called": bool(calls), "right": right, "valid": valid, "broken": broken}


def accuracy(scheduler: Scheduler, enforce: bool) -> dict[str, Any]:
    from ortllm import toolcalls  # (imported here: the throughput phase also runs on older trees)

    template = scheduler.model.chat_template
    tokenizer = scheduler.model.token_table.tokenizer

    def run(case: Case) -> dict[str, Any]:
        plan = toolcalls.plan(
            template, [{"role": "user", "content": case.prompt}], TOOLS, "auto", tokenizer=tokenizer
        )
        request = GenerationRequest(
            validate_options({"temperature": 0, "max_tokens": 160}),
            messages=plan.messages,
            tools=plan.tools,
            guidance=plan.guidance if enforce else None,
        )
        result = scheduler.generate(request)
        parser = plan.parser()
        parser.feed(result.text)
        parser.finish()
        verdict = judge(case, parser.calls, result.text)
        return {
            "prompt": case.prompt,
            "expected": case.tool,
            "calls": [c.__dict__ for c in parser.calls],
            "text": result.text,
            **verdict,
        }

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(run, CASES))
    calls_needed = [r for r in rows if r["expected"]]
    no_call = [r for r in rows if not r["expected"]]
    made = [r for r in rows if r["called"]]
    return {
        "enforced": enforce,
        "seconds": round(time.monotonic() - start, 1),
        "cases": len(rows),
        "right_tool": f"{sum(r['right'] for r in calls_needed)}/{len(calls_needed)}",
        "no_call_when_none_needed": f"{sum(r['right'] for r in no_call)}/{len(no_call)}",
        "schema_valid_calls": f"{sum(r['valid'] for r in made)}/{len(made)}",
        "broken_call_attempts": sum(r["broken"] for r in rows),
        "accuracy": round(sum(r["right"] and r["valid"] for r in rows) / len(rows), 3),
        "rows": rows,
    }


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 5},
    },
    "required": ["city", "facts"],
    "additionalProperties": False,
}


def throughput(name: str, batcher: str, concurrency: int, stagger_s: float = 0.0) -> dict[str, Any]:
    """`concurrency` constrained requests on `batcher` (auto: what serving uses), all at once or one every
    `stagger_s` seconds (requests that arrive while others run, as a server sees them)."""
    model = LoadedModel(ModelStore().get(name), batcher=batcher)
    scheduler = Scheduler(model, batcher=None if batcher == "auto" else batcher)
    try:
        cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quebec", "Nairobi", "Perth"]

        def run(i: int) -> int:
            time.sleep(i * stagger_s)
            prompt = f"Give five facts about {cities[i % len(cities)]} as JSON."
            request = GenerationRequest(
                validate_options({"temperature": 0, "max_tokens": 256}),
                messages=[{"role": "user", "content": prompt}],
                guidance=("json_schema", json.dumps(SCHEMA)),
            )
            result = scheduler.generate(request)
            json.loads(result.text)  # the constraint held
            return result.usage.completion_tokens

        run(0)  # warm-up (the grammar tokenizer, the first KV slot)
        start = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(run, range(concurrency)))
        seconds = time.monotonic() - start
        return {
            "batcher": batcher,
            "stagger_s": stagger_s,
            "requests": concurrency,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    finally:
        scheduler.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--phases", default="accuracy,throughput")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between arrivals (second round)")
    parser.add_argument("--batchers", default="native,engine", help="auto = what `ortllm serve` uses")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    report: dict[str, Any] = {"model": args.model, "machine": f"{platform.processor() or platform.machine()}"}
    if "accuracy" in phases:
        model = LoadedModel(ModelStore().get(args.model))
        scheduler = Scheduler(model)
        try:
            report["accuracy"] = [accuracy(scheduler, True), accuracy(scheduler, False)]
        finally:
            scheduler.close()
        for r in report["accuracy"]:
            print({k: v for k, v in r.items() if k != "rows"})
    if "throughput" in phases:
        report["throughput"] = [
            throughput(args.model, b, args.concurrency, stagger)
            for stagger in (0.0, args.stagger)
            for b in args.batchers.split(",")
        ]
        for r in report["throughput"]:
            print(r)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
