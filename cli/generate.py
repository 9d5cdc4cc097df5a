"""Generation commands: `run` (one-shot, pipe-friendly) and `chat` (interactive terminal chat)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.prompt import Confirm
from rich.text import Text

from ortllm.catalog import load_catalog
from ortllm.conversation import ChatSession, plan_turn
from ortllm.errors import ContextOverflow, ModelNotFound
from ortllm.runtime.embedder import not_generative
from ortllm.runtime.loaded import BATCHERS, check_runtime_env
from ortllm.runtime.options import validate_options
from ortllm.runtime.registry import ModelRegistry
from ortllm.runtime.scheduler import Scheduler
from ortllm.runtime.types import GenerationRequest, TokenEvent
from ortllm.sessions import SessionStore

from .options import option_group

generation_options = option_group(
    click.option("--temperature", type=float, help="0 (greedy) to 2."),
    click.option("--top-p", type=float, help="Nucleus sampling, 0 to 1."),
    click.option("--top-k", type=int, help="Top-k sampling, 0 disables."),
    click.option("--max-tokens", type=int, help="Most tokens to generate."),
    click.option("--ctx", "num_ctx", type=int,
                 help="Context window (prompt + answer), at most the model's; default: the model's."),
    click.option("--repeat-penalty", type=float, help="Repetition penalty (1 = off)."),
    click.option("--seed", type=int, help="Random seed for reproducible sampling."),
    click.option("--stop", multiple=True, help="Stop sequence (repeatable)."),
    click.option("--ep", type=click.Choice(["cpu", "cuda", "dml", "webgpu"]), help="Force an execution provider."),
    click.option("--batcher", type=click.Choice(BATCHERS), default="auto", show_default=True,
                 help="Who batches: ortllm's own (native, CPU), og.Engine (0.18+) or the older og.Generator."),
    click.option("--api", "api_alias", type=click.Choice(BATCHERS), hidden=True, help="The old name of --batcher."),
)  # fmt: skip


def _options(kw: dict[str, Any], defaults: dict[str, Any]) -> Any:
    names = ("temperature", "top_p", "top_k", "max_tokens", "repeat_penalty", "seed", "num_ctx")
    raw = {k: kw.get(k) for k in names}
    raw["stop"] = list(kw["stop"]) if kw.get("stop") else None
    return validate_options(raw, defaults)


def _scheduler(name: str, ep: str | None, batcher: str, api_alias: str | None = None) -> Scheduler:
    """Load a model for the terminal, pulling it first when it is a catalog model not yet installed."""
    batcher = api_alias or batcher  # --api: the old name of --batcher, kept for one release
    check_runtime_env()
    registry = ModelRegistry(batcher=None if batcher == "auto" else batcher)
    try:
        registry.installed(name)
    except ModelNotFound:
        from .models import _run_convert, not_installed

        if load_catalog().find(name) is None:
            raise not_installed(name) from None
        from ortllm.converters.pipeline import ConvertRequest

        click.echo(f"{name} is not installed yet; pulling it first", err=True)
        _run_convert(ConvertRequest(load_catalog().get(name).name))
    runner = registry.get(name, ep=ep)
    if not isinstance(runner, Scheduler):  # an embedding model: nothing to chat with
        registry.close()
        raise not_generative(runner.model.name)
    return runner


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@generation_options
@click.option("--system", help="System prompt.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON result object instead of streaming text."
)
def run(
    model: str,
    prompt: str | None,
    system: str | None,
    raw: bool,
    as_json: bool,
    ep: str | None,
    batcher: str,
    api_alias: str | None,
    **kw: Any,
) -> None:
    """Answer one PROMPT with MODEL, streamed to stdout.

    Without PROMPT (or with '-') the prompt is read from stdin, so it pipes:

    \b
      ortllm run smollm2-135m "What is the capital of France?"
      echo "Summarise: ..." | ortllm run smollm2-135m --max-tokens 100
      ortllm run smollm2-135m "Hi" --json | jq .usage
    """
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    scheduler = _scheduler(model, ep, batcher, api_alias)
    options = _options(kw, scheduler.model.parameters)
    if raw:
        request = GenerationRequest(options, prompt=prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        request = GenerationRequest(options, messages=messages)
    stream = scheduler.submit(request)  # read to its end (or interrupted), it frees its slot itself
    if as_json:
        result = stream.result()
        click.echo(json.dumps({"model": scheduler.model.name, **result.as_dict()}))
    else:
        for event in stream:
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
    scheduler.close()


HELP = """Commands:
  /reset           start a new conversation (new session)
  /system TEXT     set the system prompt (empty to clear)
  /save NAME       save this conversation as session NAME
  /load NAME       continue session NAME
  /stats           timings of the last answer
  /exit            leave (also Ctrl-D)
Ctrl-C stops the current answer without leaving; at the prompt, Ctrl-C twice leaves."""


class TerminalChat:
    """The interactive loop of `ortllm chat`."""

    def __init__(
        self, scheduler: Scheduler, sessions: SessionStore, options: Any, system: str | None, console: Console
    ) -> None:
        self.scheduler = scheduler
        self.sessions = sessions
        self.options = options
        self.console = console
        self.session = sessions.create(
            model=scheduler.model.name, system_prompt=system, title="terminal chat"
        )
        self.last: TokenEvent | None = None

    def loop(self) -> None:
        info = self.scheduler.model.info
        self.console.print(
            f"[bold]{info.name}[/] ({info.runtime}) — session {self.session.id[:8]}. Type /help for commands."
        )
        interrupted = False  # Ctrl-C at the prompt once: a second press in a row leaves
        while True:
            try:
                line = self.console.input("[bold green]>>> [/]")
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print()
                if interrupted:
                    return
                interrupted = True
                self.console.print("[dim]press Ctrl-C again or /exit to quit[/]")
                continue
            interrupted = False
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the chat."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/help":
            self.console.print(HELP)
        elif cmd == "/reset":
            self.session = self.sessions.create(
                model=self.scheduler.model.name,
                system_prompt=self.session.system_prompt,
                title="terminal chat",
            )
            self.console.print(f"[dim]new conversation (session {self.session.id[:8]})[/]")
        elif cmd == "/system":
            self.session = self.sessions.update(self.session.id, system_prompt=arg)
            self.console.print("[dim]system prompt " + ("set" if arg else "cleared") + "[/]")
        elif cmd == "/save":
            if not arg:
                self.console.print("[red]usage: /save NAME[/]")
                return True
            saved = self.sessions.create(
                model=self.scheduler.model.name,
                system_prompt=self.session.system_prompt,
                session_id=arg,
                title=arg,
            )
            self.sessions.replace(saved.id, self.sessions.messages(self.session.id))
            self.console.print(f"[dim]saved as session {arg}[/]")
        elif cmd == "/load":
            found = self.sessions.find(arg) if arg else None
            if found is None:
                self.console.print(f"[red]no session named {arg!r}[/]")
                return True
            self.session = found
            self.console.print(f"[dim]loaded session {arg} ({found.message_count} messages)[/]")
        elif cmd == "/stats":
            self.console.print(self._stats() if self.last else "[dim]no answer yet[/]")
        else:
            self.console.print(f"[red]unknown command {cmd}[/] (try /help)")
        return True

    def answer(self, text: str) -> None:
        """One turn, ended by conversation.py's rule: a complete answer is stored; Ctrl-C withdraws the
        question; a failed answer leaves it stored, unanswered."""
        while True:
            turn = plan_turn(
                self.sessions,
                model=self.scheduler.model.name,
                messages=[{"role": "user", "content": text}],
                session_id=self.session.id,
            )
            try:
                stream = self.scheduler.submit(
                    GenerationRequest(self.options, messages=turn.messages, session_id=turn.session_id)
                )
                break
            except ContextOverflow as exc:
                if not self._drop_oldest(exc):
                    return
        chat = ChatSession.begin(self.sessions, turn, stream)  # the question is kept if the process dies
        chunks = 0
        started = time.monotonic()
        with Live(console=self.console, refresh_per_second=12, transient=False) as live:
            try:
                for event in stream:
                    chunks += bool(event.text)
                    if event.done:
                        self.last = event
                    live.update(self._view(stream.text, chunks, started, event if event.done else None))
            except KeyboardInterrupt:
                chat.cancel()  # the user stopped it: the turn is undone
                self._drain(stream)
                live.update(self._view(stream.text, chunks, started, self.last, stopped=True))

    def _drop_oldest(self, overflow: ContextOverflow) -> bool:
        """The conversation outgrew the context: offer to drop its oldest turn (never silently); whether to
        try again."""
        stored = self.sessions.messages(self.session.id, answered_only=True)
        first_answer = next((i for i, m in enumerate(stored) if m["role"] == "assistant"), None)
        if first_answer is None:  # the question alone is too long: nothing older to drop
            self.console.print(f"[red]{overflow}[/]: shorten the question, or use a larger --ctx")
            return False
        self.console.print(f"[yellow]{overflow}[/]: the conversation no longer fits.")
        try:
            drop = Confirm.ask("Drop the oldest turn and continue?", default=True, console=self.console)
        except (KeyboardInterrupt, EOFError):
            drop = False
        if not drop:
            self.console.print("[dim]not sent; /reset starts a new conversation[/]")
            return False
        self.sessions.replace(self.session.id, stored[first_answer + 1 :])
        self.console.print("[dim]dropped the oldest turn[/]")
        return True

    def _drain(self, stream: Any) -> None:
        """Read a stopped answer on to its final event (its timings for the status line)."""
        while stream.final is None:
            try:
                for event in stream:
                    if event.done:
                        self.last = event
            except KeyboardInterrupt:  # pressed again while the answer winds down: it is stopping already
                continue
        self.last = stream.final

    def _view(
        self, text: str, chunks: int, started: float, final: TokenEvent | None, stopped: bool = False
    ) -> Group:
        elapsed = time.monotonic() - started
        if final and final.timings and final.usage:
            t = final.timings
            status = (
                f"{final.usage.completion_tokens} tokens · TTFT {t.ttft_s * 1000:.0f} ms · "
                f"{t.decode_tokens_per_s:.1f} tok/s" + (" · stopped" if stopped else "")
            )
        else:
            status = f"{chunks} tokens · {elapsed:.1f} s"
        return Group(Markdown(text or "…"), Text(status, style="dim"))

    def _stats(self) -> str:
        assert self.last is not None and self.last.usage and self.last.timings
        u, t = self.last.usage, self.last.timings
        return (
            f"prompt {u.prompt_tokens} tokens, answer {u.completion_tokens} tokens ({self.last.finish_reason}); "
            f"queued {t.queued_s * 1000:.0f} ms, TTFT {t.ttft_s * 1000:.0f} ms, "
            f"decode {t.decode_tokens_per_s:.1f} tok/s, total {t.total_s:.2f} s"
        )


@click.command()
@click.argument("model", required=False)
@generation_options
@click.option("--system", help="System prompt for the conversation.")
def chat(
    model: str | None, system: str | None, ep: str | None, batcher: str, api_alias: str | None, **kw: Any
) -> None:
    """Chat with MODEL in the terminal (default: the catalog's default model).

    Answers stream live as markdown, with TTFT and tokens/s. Conversations are saved as
    sessions ($ORTLLM_HOME/sessions.db). Type /help inside the chat for commands.
    """
    console = Console(highlight=False)  # model text is prose: no automatic number/path colouring
    scheduler = _scheduler(model or load_catalog().default, ep, batcher, api_alias)
    options = _options(kw, scheduler.model.parameters)
    try:
        TerminalChat(scheduler, SessionStore(), options, system, console).loop()
    finally:
        scheduler.close()


COMMANDS = [run, chat]
