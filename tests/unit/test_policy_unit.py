"""Migration policies: defaults < cluster < VM < request, and the snapshot a task keeps (pure)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvmotion.controller import policy
from kvmotion.models.api import MigrateRequest, MigrationPolicy


def test_defaults_when_nothing_is_set() -> None:
    req, snap = policy.effective(MigrateRequest(host="h2"), {}, {})
    assert (req.downtime_ms, req.progress_timeout_s, req.completion_timeout_s_per_gib, req.auto_converge,
            req.xbzrle) == (500, 150.0, 150.0, True, None)
    assert {v["from"] for v in snap.values()} == {"default"}


def test_each_layer_overrides_the_one_below() -> None:
    cluster = {"downtime_ms": 300, "auto_converge": False, "progress_timeout_s": 60.0}
    vm = {"downtime_ms": 200, "xbzrle": False}
    req, snap = policy.effective(MigrateRequest(host="h2", progress_timeout_s=30.0), cluster, vm)
    assert req.downtime_ms == 200 and snap["downtime_ms"] == {"value": 200, "from": "vm"}
    assert req.auto_converge is False and snap["auto_converge"]["from"] == "cluster"
    assert req.progress_timeout_s == 30.0 and snap["progress_timeout_s"]["from"] == "request"
    assert req.xbzrle is False and snap["xbzrle"]["from"] == "vm"
    assert req.completion_timeout_s_per_gib == 150.0 and snap["completion_timeout_s_per_gib"]["from"] == "default"
    assert req.host == "h2"                                  # the rest of the request is untouched


def test_merge_replaces_only_what_is_set() -> None:
    cur = {"downtime_ms": 200, "auto_converge": False}
    assert policy.merge(cur, MigrationPolicy(downtime_ms=300)) == {"downtime_ms": 300, "auto_converge": False}
    assert policy.merge(cur, MigrationPolicy()) == cur


@pytest.mark.parametrize("bad", [{"downtime_ms": 5}, {"progress_timeout_s": 0}, {"unknown": 1},
                                 {"completion_timeout_s_per_gib": float("nan")}])
def test_bad_policies_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        MigrationPolicy.model_validate(bad)
