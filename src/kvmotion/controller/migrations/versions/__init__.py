"""One Alembic revision per file: ``NNNN_what.py`` with ``revision = "NNNN"`` and the one before it."""
