"""Basic vMotion prechecks: pure, read-only functions over live host facts.

Every finding is returned at once (never only the first blocker). The full SPEC §3 checker builds
on the same ``Finding`` shape.
"""
from __future__ import annotations

from kvmotion.common.types import HostFacts, VMSpec
from kvmotion.controller.schemas import Finding, Severity

MEMORY_HEADROOM_MB = 64


def _err(code: str, subject: str, message: str, remedy: str) -> Finding:
    return Finding(code=code, severity=Severity.ERROR, subject=subject, message=message, remedy=remedy)


def vmotion_prechecks(spec: VMSpec, power_state: str, source: str, destination: str, dst_state: str,
                      dst_facts: HostFacts | None) -> list[Finding]:
    findings: list[Finding] = []
    if destination == source:
        findings.append(_err("SAME_HOST", f"host:{destination}",
                             f"VM {spec.name} already runs on {destination}",
                             "choose a different destination host"))
    if power_state != "poweredOn":
        findings.append(_err("VM_NOT_RUNNING", f"vm:{spec.name}",
                             f"VM {spec.name} is powered off; vMotion moves running VMs",
                             "use cold migration for a powered-off VM, or power it on first"))
    if dst_state != "connected" or dst_facts is None:
        findings.append(_err("HOST_NOT_CONNECTED", f"host:{destination}",
                             f"destination host {destination} is {dst_state}",
                             f"start kvmotion-agent on {destination} or reconnect it"))
        return findings
    readable = {d.name for d in dst_facts.datastores if d.readable}
    needed = {spec.boot_datastore} | {d.datastore for d in spec.disks}
    for ds in sorted(needed - readable):
        findings.append(_err("DATASTORE_NOT_ACCESSIBLE", f"datastore:{ds}",
                             f"datastore {ds} holding VM {spec.name}'s files is not readable on {destination}",
                             f"mount {ds} on {destination}, choose a host that sees it, or move the storage too"))
    groups = {p.name for p in dst_facts.portgroups}
    for nic in spec.nics:
        if nic.portgroup not in groups:
            findings.append(_err("PORTGROUP_MISSING", f"network:{nic.portgroup}",
                                 f"port group {nic.portgroup!r} of {nic.id} does not exist on {destination}",
                                 f"create {nic.portgroup!r} on {destination} or pick another host"))
    need_mb = spec.memory_mb + MEMORY_HEADROOM_MB
    if dst_facts.mem_free_mb < need_mb:
        findings.append(_err("INSUFFICIENT_MEMORY", f"host:{destination}",
                             f"{destination} has {dst_facts.mem_free_mb} MiB free; VM {spec.name} needs {need_mb} MiB",
                             "free memory on the destination or pick another host"))
    if not any(i.enabled and i.address for i in dst_facts.migration_interfaces):
        findings.append(_err("NO_MIGRATION_INTERFACE", f"host:{destination}",
                             f"{destination} has no migration-enabled interface with an address",
                             f"configure the migration interface on {destination}"))
    return findings


def blockers(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == Severity.ERROR]
