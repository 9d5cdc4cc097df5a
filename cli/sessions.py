"""`ortllm sessions`: the sessions database itself (moving it to a shared PostgreSQL for replicas)."""

from __future__ import annotations

import click

from ortllm.db import Database, copy_database, default_url


@click.group("sessions")
def sessions_group() -> None:
    """The sessions database (chat sessions and stored responses)."""


@sessions_group.command("copy")
@click.argument("target")
@click.option(
    "--from",
    "source",
    help="The database to copy from (default: $ORTLLM_DATABASE_URL, else sessions.db in the ortllm home).",
)
def copy_cmd(target: str, source: str | None) -> None:
    """Copy every session and stored response into the empty database TARGET.

    \b
    Example (then start each replica with ORTLLM_DATABASE_URL set to TARGET):
      ortllm sessions copy postgresql://ortllm:PASSWORD@db.example/ortllm
    """
    src = Database.open(source or default_url())
    dst = Database.open(target)
    counts = copy_database(src, dst)
    click.echo(
        f"copied {counts['sessions']} sessions ({counts['messages']} messages) and "
        f"{counts['responses']} stored responses from {src.shown} to {dst.shown}"
    )


COMMANDS = [sessions_group]
