"""`--batcher` names who batches in every command that loads a model; `--api` stays a hidden alias."""

from __future__ import annotations

import click
import pytest

from cli.bench import engine
from cli.generate import chat, run


def parse(command: click.Command, *args: str) -> dict[str, object]:
    positional = [] if command is engine else ["smollm2-135m"]
    return command.make_context(command.name, [*positional, *args]).params


@pytest.mark.parametrize("command", [run, chat, engine], ids=lambda c: c.name)
def test_batcher_option_and_its_hidden_old_name(command: click.Command) -> None:
    assert parse(command)["batcher"] == "auto"
    assert parse(command, "--batcher", "native")["batcher"] == "native"
    old = parse(command, "--api", "generator")  # the old spelling still works for one release
    assert (old["api_alias"] or old["batcher"]) == "generator"
    with pytest.raises(click.BadParameter):
        parse(command, "--batcher", "fast")
    shown = command.get_help(command.make_context(command.name, [], resilient_parsing=True))
    assert "--batcher" in shown and "--api " not in shown and "--api," not in shown
