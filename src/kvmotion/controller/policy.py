"""Migration policies: built-in defaults, overridden by the cluster, by the VM, and by the request (pure)."""
from __future__ import annotations

from typing import Any

from kvmotion.models.api import MigrateRequest, MigrationPolicy

DEFAULTS: dict[str, Any] = {"downtime_ms": 500, "progress_timeout_s": 150.0, "completion_timeout_s_per_gib": 150.0,
                            "auto_converge": True, "xbzrle": None, "allow_postcopy": False}
FIELDS = tuple(DEFAULTS)


def merge(current: dict[str, Any], change: MigrationPolicy) -> dict[str, Any]:
    """A stored policy with the fields ``change`` sets replaced (fields it does not mention are kept)."""
    return {**current, **change.model_dump(exclude_unset=True)}


def effective(req: MigrateRequest, cluster: dict[str, Any], vm: dict[str, Any]) -> tuple[MigrateRequest, dict]:
    """The request with every policy field filled, and the snapshot: each value and where it came from."""
    explicit = req.model_dump(exclude_unset=True)
    values: dict[str, Any] = {}
    snapshot: dict[str, dict[str, Any]] = {}
    for f in FIELDS:
        source, value = "default", DEFAULTS[f]
        for name, layer in (("request", explicit), ("vm", vm), ("cluster", cluster)):
            if layer.get(f) is not None:
                source, value = name, layer[f]
                break
        values[f] = value
        snapshot[f] = {"value": value, "from": source}
    return req.model_copy(update=values), snapshot
