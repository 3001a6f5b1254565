"""Hosts, datastores, networks and VMs: typed service functions shared by the API, CLI and tests."""
from __future__ import annotations

import asyncio
import ipaddress
import re
import urllib.parse
import json
import time
import uuid as uuidlib
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import AgentUnreachable, ConflictError, InvalidInputError, KvmotionError, NotFoundError
from kvmotion.common.hostauth import SECRET_FILE, check_secret
from kvmotion.models.agent import CdromSpec, DiskSpec, HostFacts, ImageSource, VMSpec
from kvmotion.models.boot import linked_clone_problem
from kvmotion.models.hardware import cache_choice
from kvmotion.controller.agents import AgentClient
from kvmotion.controller.agenttls import AgentTls, check_presented
from kvmotion.common.pinning import ClientTls
from kvmotion.controller.keys import KeyProvider
from kvmotion.controller import cloudinit, devices, guest, hostfacts, hostnet, imagestore, policy
from kvmotion.models.cloudinit import seed_cdrom
from kvmotion.controller.db import VM, Datastore, Host, HostDatastore, Network
from kvmotion.models.api import CdromChange, HostOut, VMCreate, VMOut, VMUpdate


def host_out(h: Host) -> HostOut:
    return HostOut(name=h.name, address=h.address, state=h.state, maintenance=h.maintenance,
                   cluster=h.cluster, last_seen=h.last_seen, last_error=h.last_error, facts=h.facts)


def vm_out(v: VM, runtime: dict[str, Any] | None = None) -> VMOut:
    return VMOut(uuid=v.uuid, name=v.name, host=v.host, power_state=v.power_state,
                 spec=json.loads(v.spec_json), runtime=runtime, migration_policy=json.loads(v.policy_json or "{}"))


def agent_url(address: str) -> str:
    """An agent's base URL: http(s)://HOST[:PORT], nothing else."""
    remedy = "give the agent URL, e.g. https://198.18.0.11:8770"
    try:
        url = urllib.parse.urlsplit(address)
        port = url.port
    except ValueError as exc:
        raise InvalidInputError(f"host address {address[:100]!r} is not a valid URL ({exc})", remedy=remedy) from exc
    host = url.hostname or ""
    if url.scheme not in ("http", "https") or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}", host) \
            or url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        raise InvalidInputError(f"host address {address[:100]!r} is not an agent URL", remedy=remedy)
    if url.scheme != "https":
        raise InvalidInputError(f"host address {address[:100]!r} is not HTTPS: agents serve only HTTPS",
                                remedy=f"use https://{url.netloc}")
    netloc = f"[{host}]" if ":" in host else host
    return f"{url.scheme}://{netloc}" + (f":{port}" if port else "")


class Inventory:
    def __init__(self, sessions: sessionmaker[Session], vm_ip_pool: str | None = None,
                 keys: KeyProvider | None = None, host_networks: list[str] | None = None) -> None:
        self.sessions = sessions
        self.agent_tls: AgentTls | None = None      # mutual TLS with the agents (set by the controller)
        self.host_networks = hostnet.networks(host_networks or [])
        self.vm_ip_pool = vm_ip_pool      # e.g. "198.18.1.100-198.18.1.199/24"
        self.keys = keys

    def disk_keys(self, spec: VMSpec) -> dict[str, str]:
        """Unwrapped passphrases of the VM's encrypted disks, for the agent that starts its QEMU."""
        if self.keys is None:
            return {}
        return {d.node: self.keys.unwrap(d.key_wrapped, f"{spec.uuid}/{d.node}")
                for d in spec.disks if d.encrypted and d.key_wrapped}

    # -- hosts ----------------------------------------------------------------------------
    def agent(self, host: str) -> AgentClient:
        return AgentClient(host, self.get_host(host).address, self.host_secret(host),
                           wrap_key=lambda: self.keywrap_public(host), tls=self.agent_tls_for(host))

    def agent_tls_for(self, host: str) -> ClientTls:
        """Our client certificate and the host's pinned certificates (none: a first contact)."""
        return self.agent_tls.client(host) if self.agent_tls is not None else ClientTls()

    def keywrap_public(self, host: str) -> str | None:
        """The key the host's agent publishes for wrapping disk passphrases (None: an agent without one)."""
        facts = self.host_facts(host)
        return facts.keywrap_public if facts is not None else None

    def host_secret(self, name: str) -> str:
        with self.sessions() as s:
            h = s.get(Host, name)
            wrapped = h.secret_wrapped if h is not None else ""
        if not wrapped or self.keys is None:
            raise ConflictError(f"host {name!r} has no enrolment secret", remedy=f"enrol it again: `kvmotion host add "
                                f"URL --secret-file FILE` with the agent's {SECRET_FILE}")
        return self.keys.unwrap(wrapped, f"host/{name}")

    def get_host(self, name: str) -> HostOut:
        with self.sessions() as s:
            h = s.get(Host, name)
            if h is None:
                known = ", ".join(s.scalars(select(Host.name)).all()) or "none"
                raise NotFoundError(f"host {name!r} is not in the inventory (known: {known})",
                                    remedy="add it with `kvmotion host add ADDRESS`")
            return host_out(h)

    def host_facts(self, name: str) -> HostFacts | None:
        facts = self.get_host(name).facts
        return HostFacts.model_validate(facts) if facts else None

    def host_names(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Host.name).order_by(Host.name)).all())

    def list_hosts(self) -> list[HostOut]:
        with self.sessions() as s:
            return [host_out(h) for h in s.scalars(select(Host).order_by(Host.name)).all()]

    async def add_host(self, address: str, secret: str, name: str | None = None, replace: bool = True) -> HostOut:
        """Enrol (or re-enrol) a host by its agent address and secret; the agent's own facts name it.

        ``replace=False`` may not change the secret of a host that is already enrolled.
        """
        address, facts, cert = await self.probe_agent(address, secret, name)
        return self.enrol(address, secret, facts, replace, cert)

    async def probe_agent(self, address: str, secret: str, name: str | None) -> tuple[str, HostFacts, str | None]:
        """The agent at ``address`` (allowed by the host networks), asked for its facts with a call signed with
        ``secret``: a wrong secret is refused by the agent itself. Nothing the far end says is relayed."""
        address = agent_url(address)
        check_secret(secret)
        try:
            await asyncio.wait_for(asyncio.to_thread(hostnet.check_address, address, self.host_networks), 10)
        except asyncio.TimeoutError as exc:
            raise InvalidInputError(f"host address {address} did not resolve within 10 s",
                                    remedy="give the agent's IP address") from exc
        try:
            client = AgentClient(name or address, address, secret,
                                 tls=self.agent_tls.first_contact() if self.agent_tls else None)
            facts = await client.facts()
        except AgentUnreachable as exc:
            raise InvalidInputError(f"no kvmotion agent answers at {address}",
                                    remedy="check the address and that kvmotion-agent runs there") from exc
        except KvmotionError as exc:       # whatever the far end said, it is not relayed (it may not be an agent)
            if exc.details.get("auth_refused"):
                raise InvalidInputError(f"the agent at {address} refused the secret",
                                        remedy=f"give the secret from that host's {SECRET_FILE}") from exc
            raise InvalidInputError(f"no kvmotion agent answers at {address}",
                                    remedy="check the address and port (the agent listens on 8770 by default)"
                                    ) from exc
        except ValidationError as exc:     # it answered JSON, but not a host's facts
            raise InvalidInputError(f"no kvmotion agent answers at {address}: its facts do not parse",
                                    remedy="check the address and port, and that both run the same kvmotion"
                                    ) from exc
        check_presented(address, facts, client.peer_pem)
        if name and name != facts.name:
            raise InvalidInputError(f"the agent at {address} is host {facts.name!r}, not {name!r}",
                                    remedy=f"use the name {facts.name!r} or omit it")
        return address, facts, client.peer_pem

    def enrol(self, address: str, secret: str, facts: HostFacts, replace: bool, cert_pem: str | None) -> HostOut:
        assert self.keys is not None
        with self.sessions.begin() as s:
            h = s.get(Host, facts.name)
            if h is not None and h.secret_wrapped and not replace \
                    and self.keys.unwrap(h.secret_wrapped, f"host/{facts.name}") != secret:
                raise ConflictError(f"host {facts.name!r} is already enrolled with another secret",
                                    remedy="an admin can re-enrol it: `kvmotion host add URL --secret-file FILE`")
            h = h or Host(name=facts.name, address=address)
            h.address = address
            h.secret_wrapped = self.keys.wrap(secret, f"host/{facts.name}")
            s.add(h)
        if self.agent_tls is not None and cert_pem is not None:
            self.agent_tls.pin(facts.name, cert_pem, replace=True)
        self.store_facts(facts.name, facts)
        return self.get_host(facts.name)

    def secret_matches(self, name: str, secret: str) -> bool | None:
        """Whether host ``name`` is enrolled with ``secret`` (None: not enrolled)."""
        with self.sessions() as s:
            h = s.get(Host, name)
            wrapped = h.secret_wrapped if h is not None else ""
        if not wrapped or self.keys is None:
            return None
        return self.keys.unwrap(wrapped, f"host/{name}") == secret

    def store_facts(self, name: str, facts: HostFacts) -> None:
        """A host's facts, validated: they describe this host only (``hostfacts``: never rewriting a datastore
        that other hosts see, nor storing what does not fit)."""
        if facts.name != name:
            self.mark_disconnected(name, f"the agent at this host's address now says it is {facts.name!r}")
            return
        hostfacts.store_facts(self.sessions, name, facts)

    def mark_disconnected(self, name: str, error: str) -> None:
        with self.sessions.begin() as s:
            h = s.get(Host, name)
            if h is not None:
                h.state, h.last_error = "disconnected", error

    async def refresh_host(self, name: str) -> HostOut:
        """The host's facts asked for and stored, or the host marked disconnected; the database work in a thread
        (the monitor refreshes many hosts at once: the event loop only waits for their agents)."""
        try:
            asked_at = time.time()
            facts = await (await asyncio.to_thread(self.agent, name)).facts()
            await asyncio.to_thread(self._take_facts, name, facts, asked_at)
        except KvmotionError as exc:
            await asyncio.to_thread(self.mark_disconnected, name, exc.message)
        return await asyncio.to_thread(self.get_host, name)

    def _take_facts(self, name: str, facts: HostFacts, asked_at: float) -> None:
        self.store_facts(name, facts)
        guest.follow_power_events(self, name, facts, asked_at)     # VMs that powered off by themselves

    def datastores(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            out = []
            for ds in s.scalars(select(Datastore).order_by(Datastore.name)).all():
                links = s.scalars(select(HostDatastore).where(HostDatastore.datastore == ds.uuid)).all()
                out.append({"uuid": ds.uuid, "name": ds.name, "kind": ds.kind, "shared": bool(ds.shared),
                            "hosts": sorted(h.host for h in links if h.accessible),
                            "free_mb": max((h.free_mb for h in links), default=0),
                            "capacity_mb": max((h.total_mb for h in links), default=0) or None})
            return out

    def networks(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            by_name: dict[str, list[str]] = {}
            for n in s.scalars(select(Network)).all():
                by_name.setdefault(n.name, []).append(n.host)
            return [{"name": k, "hosts": sorted(v)} for k, v in sorted(by_name.items())]

    # -- VMs ------------------------------------------------------------------------------
    def get_vm(self, ref: str) -> VMOut:
        with self.sessions() as s:
            v = s.get(VM, ref) or s.scalars(select(VM).where(VM.name == ref)).first()
            if v is None:
                raise NotFoundError(f"VM {ref!r} is not in the inventory",
                                    remedy="check the name with `kvmotion vm list`")
            return vm_out(v)

    def owned_vm(self, ref: str) -> VMOut:
        """A VM this controller may act on: not one held for a move from another controller."""
        vm = self.get_vm(ref)
        if vm.power_state == "incoming":
            raise ConflictError(f"VM {vm.name} is incoming from another controller: it is not this controller's "
                                "until that move commits", remedy="wait for the move's task (kvmotion task list)")
        return vm

    def forget_vm(self, uuid: str) -> None:
        """The VM is another controller's now (a cross-controller move committed): only its record goes."""
        with self.sessions.begin() as s:
            s.execute(delete(VM).where(VM.uuid == uuid))

    def spec(self, ref: str) -> VMSpec:
        return VMSpec.model_validate(self.get_vm(ref).spec)

    def list_vms(self) -> list[VMOut]:
        with self.sessions() as s:
            return [vm_out(v) for v in s.scalars(select(VM).order_by(VM.name)).all()]

    def set_vm(self, uuid: str, **fields: Any) -> None:
        with self.sessions.begin() as s:
            v = s.get(VM, uuid)
            if v is None:
                raise NotFoundError(f"VM {uuid} vanished from the inventory", remedy="internal error")
            for k, val in fields.items():
                setattr(v, k, val)
            v.updated_at = time.time()

    def _allocate_ip(self) -> str | None:
        if not self.vm_ip_pool:
            return None
        rng, _, prefix = self.vm_ip_pool.partition("/")
        first, _, last = rng.partition("-")
        used = {VMSpec.model_validate(v.spec).guest_ip for v in self.list_vms()}
        ip = ipaddress.ip_address(first)
        while ip <= ipaddress.ip_address(last):
            cand = f"{ip}/{prefix}"
            if cand not in used:
                return cand
            ip += 1
        raise ConflictError("the VM address pool is exhausted", remedy="delete unused VMs or pass --ip")

    async def create_vm(self, req: VMCreate) -> VMOut:
        uuid = str(uuidlib.uuid4())
        seed = cloudinit.seed_files(req.cloud_init, uuid, req.name) if req.cloud_init else None   # before anything
        host = self.get_host(req.host)
        facts = self.host_facts(req.host)
        if host.maintenance:
            raise ConflictError(f"host {req.host} is in maintenance mode", remedy="place the VM on another host")
        if host.state != "connected" or facts is None:
            raise ConflictError(f"host {req.host} is {host.state}", remedy="reconnect the host's agent first")
        with self.sessions() as s:
            if s.scalars(select(VM).where(VM.name == req.name)).first() is not None:
                raise ConflictError(f"a VM named {req.name!r} already exists", remedy="choose another name")
        readable = [d for d in facts.datastores if d.readable]
        image = self._image_source(req, [d.name for d in readable])
        linked_ds = image.datastore if image is not None and image.clone == "linked" else None
        ds_name = req.datastore or linked_ds or next((d.name for d in readable if d.shared),
                                                     readable[0].name if readable else None)
        if ds_name is None or ds_name not in {d.name for d in readable}:
            names = ", ".join(d.name for d in readable) or "none"
            raise InvalidInputError(f"datastore {ds_name!r} is not accessible on {req.host} (accessible: {names})",
                                    remedy="pass --datastore with one of the accessible datastores")
        if not req.nics and req.network not in {p.name for p in facts.portgroups}:
            raise InvalidInputError(f"port group {req.network!r} does not exist on {req.host}",
                                    remedy="pass --network with an existing port group")
        if req.ip is not None:
            try:
                ipaddress.ip_interface(req.ip)
            except ValueError:
                raise InvalidInputError(f"{req.ip!r} is not an address with prefix",
                                        remedy="write it like 198.18.1.120/24") from None
        if linked_ds is not None and linked_ds != ds_name:
            raise InvalidInputError(str(linked_clone_problem("linked", linked_ds, ds_name)),
                                    remedy=f"drop --datastore (the VM then lives on {linked_ds}), or use --clone full")
        disks = self._new_disks(req, uuid, ds_name, [d.name for d in readable], facts)
        disks = devices.extra_disks(req, req.name, ds_name, [d.name for d in readable], disks)
        nics = devices.make_nics(req.nics or [devices.NicRequest(portgroup=req.network, mac=req.mac)], uuid, facts, req.host,
                                 devices.macs_in_use(self))
        spec = VMSpec(uuid=uuid, name=req.name, memory_mb=req.memory_mb, vcpus=req.vcpus,
                      disks=disks,
                      nics=nics, boot_datastore=ds_name, folder=req.name,
                      guest_ip=req.ip or self._allocate_ip(), dirty_mb_s=req.dirty_mb_s,
                      cdroms=[seed_cdrom(req.name) if seed else CdromSpec(id="cd0")], cpu_mask=req.cpu_mask,
                      encrypted_vmotion="required" if req.encrypted_disk else req.encrypted_vmotion,
                      extra_cmdline=" ".join(x for x in (
                          f"kvmotion.marker={req.marker}" if req.marker else "",
                          f"kvmotion.dirty_region={req.dirty_region_mb}" if req.dirty_region_mb else "",
                          f"kvmotion.records=vdb kvmotion.records_rate={req.records_rate} kvmotion.records_size={req.records_kb}"
                          if req.records_rate is not None else "") if x),
                      boot=req.boot_mode, firmware=req.firmware, secure_boot=req.secure_boot, gateway=req.gateway,
                      **({"cpu_model": req.cpu_model} if req.cpu_model else {}), source_image=req.library_image, **devices.hardware(req, facts))
        spec = await self.agent(req.host).provision(spec, self.disk_keys(spec), image, seed)
        await devices.claim_macs(self, spec, req.host)     # a MAC taken meanwhile: the files made are removed again
        with self.sessions.begin() as s:
            s.add(VM(uuid=uuid, name=req.name, host=req.host, power_state="poweredOff", spec_json=spec.model_dump_json()))
        return self.get_vm(uuid)

    def _image_source(self, req: VMCreate, readable: list[str]) -> ImageSource | None:
        """The image the boot disk is made from, on a datastore the host reads (the agent confines its path)."""
        image = req.image_source()
        if req.library_image is not None:
            image = imagestore.source_for(self.sessions, req.library_image, req.clone, req.host, readable,
                                          req.datastore)
        if image is not None and image.datastore not in readable:
            raise InvalidInputError(f"image datastore {image.datastore!r} is not accessible on {req.host}",
                                    remedy="copy the image to one of: " + (", ".join(readable) or "none"))
        if image is not None and req.encrypted_disk:
            raise InvalidInputError("a disk made from an image is not encrypted",
                                    remedy="drop --encrypted-disk, or create the VM without --image")
        return image

    def _new_disks(self, req: VMCreate, uuid: str, ds_name: str, readable: list[str],
                   facts: HostFacts) -> list[DiskSpec]:
        """A new VM's disks: boot, data (optional), raw LUN (optional); the boot disk encrypted on request."""
        fmt = req.disk_format
        size_mb = req.disk_size_gb * 1024 if req.disk_size_gb is not None else (1 if req.image else req.disk_mb)
        cache = cache_choice(req.disk_cache)
        disks = [DiskSpec(datastore=ds_name, path=f"{req.name}/{req.name}.{fmt}", format=fmt, size_mb=size_mb,
                          cache=cache)]
        if req.data_disk_mb is not None:
            data_ds = req.data_datastore or ds_name
            if data_ds not in readable:
                raise InvalidInputError(f"datastore {data_ds!r} is not accessible on {req.host}",
                                        remedy="pass --data-datastore with one of: " + ", ".join(readable))
            disks.append(DiskSpec(id="disk1", node="d1", datastore=data_ds, path=f"{req.name}/{req.name}-data.{fmt}",
                                  format=fmt, size_mb=req.data_disk_mb, cache=cache))
        elif req.records_rate is not None:
            raise InvalidInputError("the record writer needs a data disk", remedy="add --data-disk-mb SIZE")
        if req.encrypted_disk and fmt != "qcow2":
            raise InvalidInputError("an encrypted disk is LUKS inside qcow2", remedy="use --disk-format qcow2")
        if req.encrypted_disk:
            if req.encrypted_vmotion == "disabled":
                raise InvalidInputError("a VM with an encrypted disk always migrates encrypted",
                                        remedy="drop --encrypted-vmotion disabled (use opportunistic or required)")
            if self.keys is None:
                raise ConflictError("this controller has no key provider", remedy="start it with a PKI directory")
            _, wrapped = self.keys.new_key(f"{uuid}/d0")
            disks[0] = disks[0].model_copy(update={"encrypted": True, "key_wrapped": wrapped})
        if req.rdm is not None:
            lun = next((b for b in facts.block_devices if b.path == req.rdm and b.identity), None)
            if lun is None:
                shown = ", ".join(b.path for b in facts.block_devices) or "none"
                raise InvalidInputError(f"{req.rdm} is not a LUN presented to {req.host} (presented: {shown})",
                                        remedy="present the LUN to the host first, or pick one of those listed")
            n = len(disks)
            disks.append(DiskSpec(id=f"disk{n}", node=f"d{n}", kind="rdm", format="raw", identity=lun.identity,
                                  size_mb=lun.size_bytes // (1024 * 1024)))
        return disks

    async def start_vm(self, ref: str, evc_mode: str | None = None) -> VMOut:
        """Power on; in an EVC cluster the VM gets the baseline CPU model, enforced."""
        vm = self.owned_vm(ref)
        if vm.power_state == "poweredOn":
            raise ConflictError(f"VM {vm.name} is already powered on (on {vm.host})", remedy="nothing to do")
        if self.get_host(vm.host).maintenance:
            raise ConflictError(f"host {vm.host} is in maintenance mode", remedy="move the VM to another host first")
        spec = self.spec(vm.uuid)
        if evc_mode is not None:
            spec = spec.model_copy(update={"cpu_model": evc_mode, "cpu_enforce": True})
            self.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        runtime = await self.agent(vm.host).start(spec, self.disk_keys(spec))
        self.set_vm(vm.uuid, power_state="poweredOn")
        return vm_out_live(self.get_vm(vm.uuid), runtime.model_dump())

    async def stop_vm(self, ref: str) -> VMOut:
        vm = self.owned_vm(ref)
        if vm.power_state != "poweredOn":
            raise ConflictError(f"VM {vm.name} is already powered off", remedy="nothing to do")
        await self.agent(vm.host).stop(vm.uuid)
        self.set_vm(vm.uuid, power_state="poweredOff")
        return self.get_vm(vm.uuid)

    def update_vm(self, ref: str, req: VMUpdate) -> VMOut:
        vm = self.owned_vm(ref)
        spec = self.spec(vm.uuid)
        if req.encrypted_vmotion is not None:
            if req.encrypted_vmotion == "disabled" and spec_is_encrypted(spec):
                raise ConflictError(f"VM {vm.name} has encrypted disks: it always migrates encrypted",
                                    remedy="use opportunistic or required")
            spec.encrypted_vmotion = req.encrypted_vmotion
        fields: dict[str, Any] = {"spec_json": spec.model_dump_json()}
        if req.migration_policy is not None:
            fields["policy_json"] = json.dumps(policy.merge(vm.migration_policy, req.migration_policy))
        self.set_vm(vm.uuid, **fields)
        return self.get_vm(vm.uuid)

    def set_maintenance(self, host: str, state: int) -> HostOut:
        """0: in service, 1: in maintenance, 2: entering (being evacuated)."""
        self.get_host(host)
        with self.sessions.begin() as s:
            h = s.get(Host, host)
            assert h is not None
            h.maintenance = state
        return self.get_host(host)

    async def change_cdrom(self, ref: str, change: CdromChange) -> VMOut:
        """Connect or disconnect a CD/DVD image; live on a running VM, then recorded in its spec."""
        vm = self.owned_vm(ref)
        spec = self.spec(vm.uuid)
        drives = {c.id: c for c in spec.cdroms}
        if change.drive not in drives:
            raise NotFoundError(f"VM {vm.name} has no drive {change.drive!r} (drives: {', '.join(drives) or 'none'})",
                                remedy="name an existing CD/DVD drive with --drive")
        new = CdromSpec(id=change.drive, media=change.media, path=change.path, nbd=change.nbd,   # ISO: datastore-relative
                        datastore=(change.datastore or spec.boot_datastore) if change.media == "local" else None)
        if new.media == "local" and not new.path:
            raise InvalidInputError("local media needs an image path", remedy="pass --iso PATH")
        if new.media == "client" and not new.nbd:
            raise InvalidInputError("client media needs an NBD address", remedy="pass --client-iso PATH")
        if vm.power_state == "poweredOn":
            await self.agent(vm.host).cdrom(vm.uuid, new)
        spec.cdroms = [new if c.id == new.id else c for c in spec.cdroms]
        self.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        return self.get_vm(vm.uuid)

    async def delete_vm(self, ref: str) -> None:
        vm = self.owned_vm(ref)
        if vm.power_state == "poweredOn":
            raise ConflictError(f"VM {vm.name} is powered on", remedy=f"power it off first: kvmotion vm stop {vm.name}")
        await self.agent(vm.host).destroy_files(self.spec(vm.uuid))
        with self.sessions.begin() as s:
            s.execute(delete(VM).where(VM.uuid == vm.uuid))

    async def show_vm(self, ref: str, refresh_guest: bool = False) -> VMOut:
        vm = self.get_vm(ref)
        if vm.power_state != "poweredOn":
            return vm
        agent = self.agent(vm.host)
        try:
            runtime = (await agent.status(vm.uuid)).model_dump()
            runtime["serial_tail"] = await agent.serial(vm.uuid, 5)
        except KvmotionError as exc:
            runtime = {"error": exc.to_dict()}
        else:
            runtime["guest"] = await guest.guest_view(self, vm.host, vm.uuid, refresh_guest)
        return vm_out_live(vm, runtime)


def spec_is_encrypted(spec: VMSpec) -> bool:
    return any(d.encrypted for d in spec.disks)


def vm_out_live(vm: VMOut, runtime: dict[str, Any]) -> VMOut:
    return vm.model_copy(update={"runtime": runtime})
