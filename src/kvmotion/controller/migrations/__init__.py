"""Alembic revisions of the controller's database (``versions/``, one file per schema change, oldest first) and
their environment (``env.py``); ``kvmotion.controller.schema`` runs them. ``python -m
kvmotion.controller.migrations "what changed"`` writes the next revision from the models' difference
(docs/deploy.md, "Schema changes")."""
