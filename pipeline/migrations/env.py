"""Alembic's environment for the job store: always run through `pipeline.db.migrate`, which hands over an open
connection (and its transaction) in `config.attributes["connection"]`."""

from alembic import context

from pipeline.db import metadata

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters most tables by copying them; Alembic's batch mode does that, elsewhere it is plain
# ALTER TABLE.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
