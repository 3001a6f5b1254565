"""The checks only a cross-controller move has (pure: the destination controller gathers their inputs)."""
from __future__ import annotations

from dataclasses import dataclass

from kvmotion.models.agent import HostFacts, VMSpec
from kvmotion.models.findings import Finding, finding


@dataclass(frozen=True)
class Known:
    """What the destination controller's inventory already holds."""

    vm_uuids: frozenset[str]
    vm_names: frozenset[str]
    macs: dict[str, str]            # MAC (lowercase) -> the VM using it
    host_names: frozenset[str]


def remap(spec: VMSpec, networks: dict[str, str]) -> VMSpec:
    """The VM with its NICs on the destination's port groups (unmapped ones keep their name)."""
    nics = [n.model_copy(update={"portgroup": networks.get(n.portgroup, n.portgroup)}) for n in spec.nics]
    return spec.model_copy(update={"nics": nics})


def remap_facts(facts: HostFacts, networks: dict[str, str]) -> HostFacts:
    """The source host's port groups under their destination names (the VLAN check compares like with like)."""
    groups = [p.model_copy(update={"name": networks.get(p.name, p.name)}) for p in facts.portgroups]
    return facts.model_copy(update={"portgroups": groups})


def run(spec: VMSpec, source_host: str, networks: dict[str, str], known: Known, src: HostFacts | None,
        dst: HostFacts | None, keys: set[str] | None = None) -> list[Finding]:
    """``keys``: the disk nodes whose keys came with a reservation (None: a check only, nothing is handed over)."""
    vm = f"vm:{spec.name}"
    out = []
    if spec.uuid in known.vm_uuids or spec.name in known.vm_names:
        out.append(finding("CROSS_VM_EXISTS", vm, f"the destination controller already has a VM "
                           f"{'with UUID ' + spec.uuid if spec.uuid in known.vm_uuids else 'named ' + spec.name}",
                           "rename or remove that VM on the destination controller first"))
    for nic in spec.nics:
        other = known.macs.get(nic.mac.lower())
        if other is not None:
            out.append(finding("CROSS_MAC_IN_USE", f"device:{nic.id}", f"MAC {nic.mac} of {nic.id} is used by VM "
                               f"{other} of the destination controller",
                               f"give {nic.id} another MAC (kvmotion vm nic …) or move {other} away first"))
    used = {n.portgroup for n in spec.nics}
    for src_pg in sorted(set(networks) - used):
        out.append(finding("CROSS_NETWORK_UNMAPPED", f"network:{src_pg}",
                           f"the network mapping names {src_pg!r}, which no NIC of {spec.name} uses "
                           f"(its NICs use: {', '.join(sorted(used)) or 'none'})",
                           "map the VM's own port groups: --network SOURCE_PG=DESTINATION_PG"))
    if source_host in known.host_names:
        out.append(finding("CROSS_HOST_NAME_CLASH", f"host:{source_host}",
                           f"the destination controller has a host named {source_host} too; their TLS identities "
                           "would be the same", "rename one of the hosts (kvmotion-agent init --name)"))
    for facts, side in ((src, "source"), (dst, "destination")):
        if facts is None or facts.tls is None or not facts.tls.supported:
            out.append(finding("CROSS_ENCRYPTION_REQUIRED", f"host:{facts.name if facts else side}",
                               f"the {side} host has no valid migration certificate; a move between controllers is "
                               "always encrypted", "renew it: kvmotion host cert renew HOST (on its controller)"))
    missing = [d.id for d in spec.disks if d.encrypted and keys is not None and d.node not in keys]
    if missing:
        out.append(finding("CROSS_ENCRYPTED_DISK", vm, f"the source controller did not hand over the key of "
                           f"{', '.join(missing)} of {spec.name}", "restore the key on the source controller "
                           "(its pki/master.key), or move the VM within its controller"))
    return out
