"""DRS: a cluster's load-balancing settings, its placement rules, and what DRS recommends (``controller.drs``)."""
from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


MAX_RULES = 256
MAX_RULE_VMS = 64


class Automation(StrEnum):
    OFF = "off"                  # DRS neither recommends nor moves
    MANUAL = "manual"            # recommendations, applied by an admin (`kvmotion cluster drs apply`)
    FULLY = "fully"              # recommendations applied as they come, through admission control


class RuleKind(StrEnum):
    AFFINITY = "affinity"            # the VMs run on one host
    ANTI_AFFINITY = "anti-affinity"  # the VMs run on different hosts
    VM_HOST = "vm-host"              # the VMs run on one of the hosts
    VM_NOT_HOST = "vm-not-host"      # the VMs run on none of the hosts


RuleName = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Strict(BaseModel):
    """A request: unknown fields refused; numbers and flags are JSON numbers and booleans (``strict`` per field: a
    ``false`` is not a cooldown of 0)."""
    model_config = ConfigDict(extra="forbid")


class DrsRule(Strict):
    name: str = RuleName
    kind: RuleKind
    vms: list[str] = Field(min_length=1, max_length=MAX_RULE_VMS)       # VM names
    hosts: list[str] = Field(default_factory=list, max_length=MAX_RULE_VMS)   # vm-host and vm-not-host rules
    must: bool = Field(default=False, strict=True)   # must: never broken by a move; should: kept when a move allows
    enabled: bool = Field(default=True, strict=True)

    @model_validator(mode="after")
    def _shape(self) -> "DrsRule":
        host_rule = self.kind in (RuleKind.VM_HOST, RuleKind.VM_NOT_HOST)
        if host_rule and not self.hosts:
            raise ValueError(f"a {self.kind} rule names hosts: add hosts")
        if not host_rule and self.hosts:
            raise ValueError(f"a {self.kind} rule names VMs only: leave hosts out")
        if not host_rule and len(set(self.vms)) < 2:
            raise ValueError(f"a {self.kind} rule names at least two different VMs")
        return self


class DrsConfig(BaseModel):
    """What a cluster stores (clusters.drs_json; read and written by the controller only)."""
    automation: Automation = Automation.OFF
    threshold: int = Field(default=3, ge=1, le=5)     # 1 conservative (rules only) … 5 aggressive
    interval_s: float = Field(default=300.0, ge=5.0, le=86400.0)   # how often DRS looks at the cluster
    cooldown_s: float = Field(default=600.0, ge=0.0, le=86400.0)   # a VM DRS moved is left alone this long
    rules: list[DrsRule] = Field(default_factory=list, max_length=MAX_RULES)


class DrsUpdate(Strict):
    """``PATCH /clusters/{name}/drs``: the fields given replace the current ones."""
    automation: Automation | None = None
    threshold: int | None = Field(default=None, ge=1, le=5, strict=True)
    interval_s: float | None = Field(default=None, ge=5.0, le=86400.0, strict=True, allow_inf_nan=False)
    cooldown_s: float | None = Field(default=None, ge=0.0, le=86400.0, strict=True, allow_inf_nan=False)


class HostLoadOut(BaseModel):
    host: str
    load: float                  # the larger of CPU and memory, each a fraction of the host's capacity
    cpu_pct: float               # the VMs' CPU, percent of one host CPU (100 = one CPU busy)
    cpu_capacity_pct: float
    mem_mb: float
    mem_capacity_mb: float
    vms: list[str]
    in_service: bool


class Recommendation(BaseModel):
    id: str                      # stable for the same VM, source and destination
    vm: str
    source: str
    destination: str
    reason: Literal["rule", "balance"]
    rule: str | None = None
    priority: int                # 1 a must rule, 2 a should rule, 3..5 balance (3 the largest gain)
    gain: float                  # how much the cluster's imbalance drops
    cost_s: float | None         # the convergence predictor's time for the move (None: no prediction)
    cost_mb: float | None        # what the move sends
    imbalance_after: float


class RuleFault(BaseModel):
    rule: str
    must: bool
    vms: list[str]
    message: str
    remedy: str


class DrsStatus(BaseModel):
    cluster: str
    config: DrsConfig
    imbalance: float             # standard deviation of the in-service hosts' loads
    target: float | None         # the imbalance DRS tolerates at this threshold (None: rules only)
    hosts: list[HostLoadOut]
    recommendations: list[Recommendation]
    faults: list[RuleFault]
    last_run: float | None = None
    last_applied: list[str] = Field(default_factory=list)     # task ids of DRS's last automatic moves


class DrsApply(Strict):
    ids: list[str] | None = Field(default=None, max_length=MAX_RULES)   # None: every current recommendation


class DrsSkipped(BaseModel):
    id: str
    vm: str
    error: dict


class DrsApplied(BaseModel):
    tasks: list[str]             # the migration tasks started (kvmotion task show ID)
    skipped: list[DrsSkipped]    # recommendations a check refused now, each with why
