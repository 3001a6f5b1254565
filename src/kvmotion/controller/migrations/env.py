"""Alembic's environment for the controller's database. Alembic runs this file (it is not imported) from
``kvmotion.controller.schema``, which hands it the connection, in its transaction, through
``config.attributes["connection"]``; ``target_metadata`` (the models) is what ``--autogenerate`` compares with."""
from __future__ import annotations

from alembic import context

from kvmotion.controller.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through kvmotion.controller.schema, which passes the connection")
# render_as_batch: SQLite's ALTER TABLE cannot change or drop a column; batch mode copies the table instead
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
