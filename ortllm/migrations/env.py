"""Alembic's environment: ortllm runs its migrations on the connection it hands over (ortllm.db)."""

from alembic import context

connection = context.config.attributes["connection"]
# SQLite alters tables by copying them (batch mode); PostgreSQL alters them in place
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
