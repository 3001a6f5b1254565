"""The migration wing: one engine for every kind of move.

``kinds``: the registered kinds and their declared phase tables; ``engine``: the base every kind runs on
(persisted phases, crash points, undo chain); ``live``/``live_end``/``follow``: vMotion and shared-nothing;
``files``: Storage vMotion and cold migration; ``recover``/``recover_files``: reconciliation after a controller
restart; ``registry``: which engine and reconciler a kind has; ``ports``: the injected interfaces (inventory view,
journal, host clients). Pure planning: ``decisions``, ``tuning``, ``predict``, ``relocate``. Imports nothing
from the controller, the agent or the lab.
"""
