"""The `ortllm` command group: error handling and the subcommands' registration."""

from __future__ import annotations

import contextlib
import sys

import click

from ortllm import __version__
from ortllm.errors import OrtllmError


class OrtllmGroup(click.Group):
    """Turns OrtllmError (and Ctrl-C) into one line on stderr and exit code 1, unless --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OrtllmError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=OrtllmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ortllm")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """ortllm: convert, chat with and serve local LLMs on ONNX Runtime GenAI.

    \b
    Quick start:
      ortllm pull smollm2-135m          convert the default model (about a minute)
      ortllm run smollm2-135m "Hi!"     one answer, streamed to stdout
      ortllm chat                       interactive chat in the terminal

    Models live in $ORTLLM_HOME (default: your user data folder).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    clean_leftovers()


def clean_leftovers() -> None:
    """Remove the staging folders of conversions whose process died (`kill -9`), whatever the command."""
    from ortllm.paths import ortllm_home
    from ortllm.store import ModelStore

    with contextlib.suppress(OSError):  # an unusable store is reported by the command that needs it
        if (ortllm_home() / "models").is_dir():
            ModelStore().clean_stale()


def _register() -> None:
    from . import bench, doctor, generate, models, serve, sessions

    groups = (models, generate, serve, bench, doctor, sessions)
    for command in [c for group in groups for c in group.COMMANDS]:
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="ortllm")


if __name__ == "__main__":
    main()
