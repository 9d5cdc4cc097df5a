"""Which server process is answering a pending question (replicas share one database).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

A question stays pending until its answer is stored. A new turn clears pending questions whose turn is no
longer running; with several replicas only the process that started a turn knows that, so each pending
message names its process, and another process clears it only once it is old.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("instance", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("instance")
