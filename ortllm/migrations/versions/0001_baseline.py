"""Baseline: sessions, their messages, stored responses (the schema of sessions.db's PRAGMA user_version 3).

Revision ID: 0001
Revises:
Create Date: 2026-11-26

The tables are frozen here (not imported from ortllm.db) so that later revisions change them step by step.
A sessions.db from before the migrations already has some of them: only the missing ones are created.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

frozen = sa.MetaData()
sa.Table(
    "sessions",
    frozen,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("system_prompt", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("updated", sa.Double, nullable=False),
    sa.Column("origin", sa.Text, nullable=False, server_default="api"),
    sa.UniqueConstraint("owner", "id"),
    sa.Index("sessions_by_owner", "owner", "updated"),
    sqlite_autoincrement=True,
)
sa.Table(
    "messages",
    frozen,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_pk", sa.Integer, sa.ForeignKey("sessions.pk", ondelete="CASCADE"), nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("answered", sa.Integer, nullable=False, server_default="1"),
    sa.Column("stopped", sa.Integer, nullable=False, server_default="0"),
    sa.Index("messages_by_session", "session_pk", "id"),
    sqlite_autoincrement=True,
)
sa.Table("meta", frozen, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
sa.Table(
    "responses",
    frozen,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("input_items", sa.Text, nullable=False),
    sa.Column("output_items", sa.Text, nullable=False),
    sa.Column("usage", sa.Text),
    sa.Column("previous_response_id", sa.Text),
    sa.UniqueConstraint("owner", "id"),
    sqlite_autoincrement=True,
)


def upgrade() -> None:
    frozen.create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    frozen.drop_all(op.get_bind())
