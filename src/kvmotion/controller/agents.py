"""The controller's client for host agents: one call per driver primitive, each with a deadline."""
from __future__ import annotations

from typing import Any, Callable

import httpx

from kvmotion.common.hostauth import HostAuth
from kvmotion.common.keywrap import has_secrets, wrap_payload
from kvmotion.common.pinning import ClientTls, client_context, peer_certificate
from kvmotion.common.errors import AgentError, AgentUnreachable, KvmotionError
from kvmotion.models.agent import PostcopyRecover, PostcopyResume
from kvmotion.models.agent import DiskSpec
from kvmotion.models.devices import DiskChange, DiskRemoval
from kvmotion.models.nbd import NbdPsk
from kvmotion.models.cloudinit import ProvisionSeedRequest, SeedFiles

IMAGE_CLONE_TIMEOUT_S = 3700.0     # a full clone converts the whole image (the agent's own deadline: 3600 s)
from kvmotion.models.agent import DirtySample, GuestHealth, HealthCheckRequest, ImageSource
from kvmotion.models.agent import (DiskCopyRequest, DiskCopyStatus, DiskExport, MirrorReport, MirrorRequest,
                                   PivotReport)
from kvmotion.models.agent import (CdromSpec, HostFacts, TlsFact, IncomingReady, IncomingRequest, LeaseInfo, MigrationReport, MigrationTuning,
                                   OutgoingRequest, ReleaseReport, StartRequest, VMRuntime, VMSpec)

from kvmotion.models.guest import (CLOCK_STEP_MS, ClockSyncRequest, GuestClock, GuestFacts, PowerOpResult,
                                   PowerRequest)
from kvmotion.models.images import AgentImageImport, AgentImageRemove, AgentImportStatus, OvfClose, OvfOpen, OvfPackage

DEFAULT_TIMEOUT_S = 15.0
FACTS_CONNECT_S = 3.0              # a management network's connection is made in milliseconds: 3 s means no host
UNSIGNED_REFUSALS = (401, 413)     # the agent's refusals of a request it could not authenticate
RESPONSE_AUTH_REMEDY = {
    "missing": "upgrade kvmotion-agent on {host} to the controller's version (it signs its answers); if it is "
               "current, something else answers at the host's address: check the management network",
    "forged": "something between the controller and {host} altered or forged the answer: check the management "
              "network; if the host's secret was changed, enrol it again (`kvmotion host add`)",
}
IMAGE_IMPORT_TIMEOUT_S = 3700.0    # unpack an OVA, or convert an image (the agent's own deadline: 3600 s)
IMAGE_CHECK_TIMEOUT_S = 700.0      # qemu-img info, check and measure of a file to import (the agent's: 60+600 s)


class AgentClient:
    """Calls one agent; every request is signed with the host's enrolment secret."""

    def __init__(self, host: str, address: str, secret: str, timeout: float = DEFAULT_TIMEOUT_S,
                 wrap_key: Callable[[], str | None] | None = None, tls: ClientTls | None = None) -> None:
        self.host = host
        self.tls = tls or ClientTls()     # mutual TLS: our client certificate, the host's pinned ones
        self.peer_pem: str | None = None  # a first contact's: the certificate the far end presented
        self.address = address.rstrip("/")
        self.timeout = timeout
        self._auth = HostAuth(secret)
        self._wrap_key = wrap_key or (lambda: None)      # the host's published key for disk passphrases

    async def _call(self, method: str, path: str, json: Any = None, timeout: float | httpx.Timeout | None = None,
                    params: dict[str, Any] | None = None) -> Any:
        if has_secrets(json):                       # never in clear on the wire (common.keywrap)
            json = wrap_payload(self._wrap_key(), self.host, json)
        try:
            async with httpx.AsyncClient(timeout=timeout or self.timeout, auth=self._auth,
                                         verify=client_context(self.tls)) as client:
                r = await client.request(method, f"{self.address}{path}", json=json, params=params)
                if not self.tls.pins:
                    self.peer_pem = peer_certificate(r.extensions)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AgentUnreachable(
                f"agent of host {self.host} at {self.address} did not answer {method} {path}: {type(exc).__name__}",
                remedy=f"check that kvmotion-agent runs on {self.host} and the management network is up",
                details={"host": self.host}, cause=exc) from exc
        self._check_signed(r, method, path)
        if r.status_code >= 400:
            try:
                body = r.json()
                err = body.get("error") if isinstance(body, dict) else None
            except ValueError:
                err = None
            if err and r.status_code == 401:     # the agent refused our signature: not the API caller's fault
                raise AgentError(f"agent of host {self.host} refused the controller: {err.get('message')}",
                                 remedy=err.get("remedy") or "re-enrol the host with `kvmotion host add`",
                                 details={"host": self.host, "auth_refused": True})
            if err:
                exc2 = KvmotionError.from_dict(err)
                exc2.details.setdefault("host", self.host)
                raise exc2
            ctype = r.headers.get("content-type", "?").split(";")[0][:60]     # never the far end's text (SSRF)
            raise AgentError(f"agent of host {self.host} answered {r.status_code} ({ctype}) to {method} {path}, "
                             "not a kvmotion error", remedy="see the agent's log",
                             details={"host": self.host, "not_an_agent": True})
        try:
            return r.json()
        except ValueError as exc:     # something answered, but not a kvmotion agent (a web server, a proxy)
            raise AgentError(f"{self.host} answered {method} {path} with something that is not JSON",
                             remedy="check that the address is a kvmotion agent's",
                             details={"host": self.host, "not_an_agent": True}, cause=exc) from exc

    def _check_signed(self, r: httpx.Response, method: str, path: str) -> None:
        """Use only the agent's own answers: signed with the host's secret, for the request just sent
        (``kvmotion.common.hostauth``). An unsigned 401 or 413 is the agent refusing a request it could not
        authenticate: handled as a refusal below, and nothing of it is used. (Consoles are websockets, whose
        answers are not signed: out of scope.)"""
        state = self._auth.check_response(r)
        if state is None or (state == "missing" and r.status_code in UNSIGNED_REFUSALS):
            return
        details: dict[str, Any] = {"host": self.host, "response_auth": state}
        if state == "missing":             # an old agent, or not an agent at all (enrolment says so)
            details["not_an_agent"] = True
        what = "is not signed" if state == "missing" else "carries a signature that is not the host's, for this request"
        raise AgentError(f"the answer of host {self.host} to {method} {path} {what}; it was not used",
                         remedy=RESPONSE_AUTH_REMEDY[state].format(host=self.host), details=details)

    async def tls_csr(self) -> dict[str, str]:
        return await self._call("POST", "/v1/tls/csr", timeout=15)

    async def api_tls_csr(self) -> str:
        return str((await self._call("POST", "/v1/api-tls/csr", timeout=15))["csr"])

    async def api_tls_install(self, cert: str, ca_cert: str) -> str:
        return str((await self._call("POST", "/v1/api-tls/install", {"cert": cert, "ca_cert": ca_cert},
                                     timeout=15))["sha256"])

    async def pin_controller(self, cert: str) -> bool:
        return bool((await self._call("PUT", "/v1/api-tls/controller", {"cert": cert}, timeout=15))["pinned"])

    async def tls_crl(self, crl_pem: str) -> int:
        return int((await self._call("POST", "/v1/tls/crl", {"crl": crl_pem}, timeout=15))["revoked"])

    async def tls_install(self, ca_cert: str, server_cert: str, client_cert: str) -> TlsFact:
        return TlsFact.model_validate(await self._call("POST", "/v1/tls/install", {
            "ca_cert": ca_cert, "server_cert": server_cert, "client_cert": client_cert}, timeout=15))

    async def tls_peer_cas(self, cas: dict[str, str]) -> list[str]:
        return list((await self._call("PUT", "/v1/tls/peer-cas", {"cas": cas}, timeout=15))["trusted"])

    async def tls_remove(self) -> TlsFact:
        return TlsFact.model_validate(await self._call("DELETE", "/v1/tls", timeout=15))

    async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        return await self._call("POST", "/v1/cpu/expand", {"model": model, "mask": mask}, timeout=10)

    async def dirty_sample(self, uuid: str, max_age_s: float = 60.0, measure: bool = True) -> DirtySample:
        return DirtySample.model_validate(await self._call(
            "GET", f"/v1/vms/{uuid}/dirty", params={"max_age_s": max_age_s, "measure": measure}, timeout=10))

    async def facts(self) -> HostFacts:
        """The host's facts: 10 s to answer, but FACTS_CONNECT_S to connect (a host that is off or cut off costs
        the monitor no more than that)."""
        return HostFacts.model_validate(await self._call("GET", "/v1/facts",
                                                         timeout=httpx.Timeout(10, connect=FACTS_CONNECT_S)))

    async def provision(self, spec: VMSpec, disk_keys: dict[str, str] | None = None,
                        image: ImageSource | None = None, seed: SeedFiles | None = None) -> VMSpec:
        """The VM's files on its host; returns the spec as made (a disk from an image: its size and base)."""
        req = ProvisionSeedRequest(spec=spec, disk_keys=disk_keys or {}, image=image, seed=seed)
        timeout = IMAGE_CLONE_TIMEOUT_S if image is not None else 90
        return VMSpec.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/provision", req.model_dump(),
                                                      timeout=timeout))

    async def destroy_files(self, spec: VMSpec) -> None:
        await self._call("POST", f"/v1/vms/{spec.uuid}/destroy-files", spec.model_dump(), timeout=60)

    async def start(self, spec: VMSpec, disk_keys: dict[str, str] | None = None) -> VMRuntime:
        req = StartRequest(spec=spec, disk_keys=disk_keys or {})
        return VMRuntime.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/start", req.model_dump(),
                                                         timeout=40))

    async def cdrom(self, uuid: str, cdrom: CdromSpec) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/cdrom", cdrom.model_dump(), timeout=15)

    async def disk_create(self, spec: VMSpec, disk: DiskSpec) -> DiskSpec:
        body = DiskChange(spec=spec, disk=disk).model_dump()
        return DiskSpec.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/disks/create", body,
                                                        timeout=150))

    async def disk_remove_file(self, spec: VMSpec, disk_id: str) -> list[str]:
        body = DiskRemoval(spec=spec, disk_id=disk_id).model_dump()
        return await self._call("POST", f"/v1/vms/{spec.uuid}/disks/remove-file", body, timeout=60)

    async def disk_plug(self, spec: VMSpec, disk: DiskSpec) -> VMSpec:
        body = DiskChange(spec=spec, disk=disk).model_dump()
        return VMSpec.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/disks/plug", body, timeout=180))

    async def disk_unplug(self, spec: VMSpec, disk_id: str, delete_file: bool) -> VMSpec:
        body = DiskRemoval(spec=spec, disk_id=disk_id, delete_file=delete_file).model_dump()
        return VMSpec.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/disks/unplug", body, timeout=90))

    async def stop(self, uuid: str) -> VMRuntime:
        return VMRuntime.model_validate(await self._call("POST", f"/v1/vms/{uuid}/stop", timeout=30))

    async def status(self, uuid: str) -> VMRuntime:
        return VMRuntime.model_validate(await self._call("GET", f"/v1/vms/{uuid}", timeout=8))

    async def vms(self) -> list[VMRuntime]:
        return [VMRuntime.model_validate(v) for v in await self._call("GET", "/v1/vms", timeout=8)]

    async def health_check(self, uuid: str, req: HealthCheckRequest) -> GuestHealth:
        """Does the guest live on this host? The agent samples for ``req.window_s``, then answers."""
        return GuestHealth.model_validate(await self._call("POST", f"/v1/vms/{uuid}/health-check", req.model_dump(),
                                                           timeout=req.window_s + 10))

    async def serial(self, uuid: str, lines: int = 20) -> list[str]:
        return await self._call("GET", f"/v1/vms/{uuid}/serial", params={"lines": lines}, timeout=8)

    async def prepare_incoming(self, spec: VMSpec, listen_address: str, tls_authz_identity: str | None = None,
                               disk_keys: dict[str, str] | None = None,
                               new_disks: list[str] | None = None, multifd_channels: int = 0,
                               postcopy: bool = False, nbd_psk: NbdPsk | None = None) -> IncomingReady:
        req = IncomingRequest(spec=spec, listen_address=listen_address, tls_authz_identity=tls_authz_identity,
                              disk_keys=disk_keys or {}, new_disks=new_disks or [], multifd_channels=multifd_channels,
                              postcopy=postcopy, nbd_psk=nbd_psk)
        return IncomingReady.model_validate(await self._call("POST", f"/v1/vms/{spec.uuid}/incoming",
                                                             req.model_dump(), timeout=40))

    async def abort_incoming(self, uuid: str) -> bool:
        return bool((await self._call("DELETE", f"/v1/vms/{uuid}/incoming", timeout=20))["removed"])

    async def start_outgoing(self, uuid: str, req: OutgoingRequest) -> MigrationReport:
        return MigrationReport.model_validate(await self._call("POST", f"/v1/vms/{uuid}/outgoing",
                                                               req.model_dump(), timeout=20))

    async def migration(self, uuid: str, wait_s: float = 0.0, since: str | None = None) -> MigrationReport:
        """With ``wait_s``/``since``: a long poll that returns as soon as the status leaves ``since``."""
        params: dict[str, Any] = {"wait_s": wait_s, "since": since} if wait_s > 0 and since else {}
        return MigrationReport.model_validate(await self._call("GET", f"/v1/vms/{uuid}/migration", params=params,
                                                               timeout=5 + wait_s))

    async def tune(self, uuid: str, tuning: MigrationTuning) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/migration/tune", tuning.model_dump(), timeout=8)

    async def postcopy_start(self, uuid: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/migration/postcopy", timeout=8)

    async def postcopy_pause(self, uuid: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/migration/pause", timeout=8)

    async def postcopy_recover(self, uuid: str, listen_address: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/migration/recover",
                                PostcopyRecover(listen_address=listen_address).model_dump(), timeout=8)

    async def postcopy_resume(self, uuid: str, uri: str, probe_address: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/migration/resume",
                                PostcopyResume(uri=uri, probe_address=probe_address).model_dump(), timeout=15)

    async def cancel_outgoing(self, uuid: str, resume_if_completed: bool = True) -> MigrationReport | None:
        data = await self._call("POST", f"/v1/vms/{uuid}/migration/cancel", timeout=20,
                                params=None if resume_if_completed else {"resume_if_completed": False})
        return MigrationReport.model_validate(data) if data else None

    async def resume(self, uuid: str, announce: bool = False) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/resume", params={"announce": announce} if announce else None,
                                timeout=20)

    async def announce(self, uuid: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/vms/{uuid}/announce", timeout=10)

    async def take_lease(self, uuid: str, expected_holder: str | None) -> LeaseInfo:
        return LeaseInfo.model_validate(await self._call("POST", f"/v1/vms/{uuid}/lease",
                                                         {"expected_holder": expected_holder}, timeout=10))

    async def locks(self, uuid: str) -> dict[str, list[str]]:
        return await self._call("GET", f"/v1/vms/{uuid}/locks", timeout=8)

    async def finalize_source(self, uuid: str) -> ReleaseReport:
        return ReleaseReport.model_validate(await self._call("POST", f"/v1/vms/{uuid}/finalize-source", timeout=30))

    # -- storage ------------------------------------------------------------------------------------
    async def measure(self, spec: VMSpec, formats: dict[str, str], preallocate: bool) -> dict[str, int]:
        return await self._call("POST", "/v1/storage/measure", {"spec": spec.model_dump(), "formats": formats,
                                                                 "preallocate": preallocate}, timeout=60)

    async def home_files(self, spec: VMSpec) -> dict[str, str]:
        return await self._call("POST", "/v1/storage/home/get", spec.model_dump(), timeout=60)

    async def put_home(self, spec: VMSpec, files: dict[str, str]) -> str:
        return (await self._call("POST", "/v1/storage/home/put", {"spec": spec.model_dump(), "files": files},
                                 timeout=60))["folder"]

    async def remove_files(self, spec: VMSpec, disk_ids: list[str], home: bool) -> list[str]:
        return await self._call("POST", "/v1/storage/remove", {"spec": spec.model_dump(), "disk_ids": disk_ids,
                                                                "home": home}, timeout=60)

    async def check_images(self, spec: VMSpec, disk_ids: list[str]) -> dict[str, dict[str, Any]]:
        return await self._call("POST", "/v1/storage/check", {"spec": spec.model_dump(), "disk_ids": disk_ids},
                                timeout=150)

    async def lease_holders(self, spec: VMSpec) -> dict[str, str]:
        return await self._call("POST", "/v1/storage/leases", spec.model_dump(), timeout=10)

    async def disk_export(self, spec: VMSpec, disk_id: str, listen_address: str, tls_authz_identity: str | None,
                          psk: NbdPsk | None) -> DiskExport:
        return DiskExport.model_validate(await self._call("POST", "/v1/storage/export", {
            "spec": spec.model_dump(), "disk_id": disk_id, "listen_address": listen_address,
            "tls_authz_identity": tls_authz_identity, "psk": psk.model_dump() if psk else None}, timeout=20))

    async def disk_export_stop(self, export_id: str) -> bool:
        return bool((await self._call("DELETE", f"/v1/storage/export/{export_id}", timeout=20))["stopped"])

    async def disk_copy(self, req: DiskCopyRequest) -> DiskCopyStatus:
        return DiskCopyStatus.model_validate(await self._call("POST", "/v1/storage/copy", req.model_dump(), timeout=20))

    async def copy_status(self, job: str) -> DiskCopyStatus:
        return DiskCopyStatus.model_validate(await self._call("GET", f"/v1/storage/copy/{job}", timeout=8))

    async def copy_cancel(self, job: str) -> DiskCopyStatus:
        return DiskCopyStatus.model_validate(await self._call("DELETE", f"/v1/storage/copy/{job}", timeout=30))

    async def mirror_start(self, uuid: str, req: MirrorRequest) -> MirrorReport:
        return MirrorReport.model_validate(await self._call("POST", f"/v1/vms/{uuid}/mirror", req.model_dump(),
                                                            timeout=240))

    async def mirror_status(self, uuid: str) -> MirrorReport:
        return MirrorReport.model_validate(await self._call("GET", f"/v1/vms/{uuid}/mirror", timeout=8))

    async def mirror_speed(self, uuid: str, speed_bytes: int) -> None:
        await self._call("POST", f"/v1/vms/{uuid}/mirror/speed", {"speed_bytes": speed_bytes}, timeout=8)

    async def mirror_pivot(self, uuid: str) -> PivotReport:
        return PivotReport.model_validate(await self._call("POST", f"/v1/vms/{uuid}/mirror/pivot", timeout=90))

    async def mirror_cancel(self, uuid: str) -> MirrorReport:
        return MirrorReport.model_validate(await self._call("POST", f"/v1/vms/{uuid}/mirror/cancel", timeout=60))

    # -- image library ------------------------------------------------------------------------
    async def image_import(self, req: AgentImageImport) -> AgentImportStatus:
        """Checks the file (``qemu-img info`` and ``check``: bad input fails here), starts the copy as a job."""
        return AgentImportStatus.model_validate(await self._call("POST", "/v1/images/import", req.model_dump(),
                                                                 timeout=IMAGE_CHECK_TIMEOUT_S))

    async def image_import_status(self, job: str) -> AgentImportStatus:
        return AgentImportStatus.model_validate(await self._call("GET", f"/v1/images/import/{job}", timeout=10))

    async def image_remove(self, datastore: str, name: str) -> bool:
        return bool((await self._call("POST", "/v1/images/remove", AgentImageRemove(
            datastore=datastore, name=name).model_dump(), timeout=30))["removed"])

    async def ovf_open(self, req: OvfOpen) -> OvfPackage:
        return OvfPackage.model_validate(await self._call("POST", "/v1/images/ovf/open", req.model_dump(),
                                                          timeout=IMAGE_IMPORT_TIMEOUT_S))

    async def ovf_close(self, req: OvfClose) -> bool:
        return bool((await self._call("POST", "/v1/images/ovf/close", req.model_dump(), timeout=60))["removed"])

    # -- guest agent and graceful power (kvmotion.agent.guest) ------------------------------
    async def guest_facts(self, uuid: str, max_age_s: float = 30.0, deadline_s: float = 1.5) -> GuestFacts:
        return GuestFacts.model_validate(await self._call(
            "GET", f"/v1/vms/{uuid}/guest", params={"max_age_s": max_age_s, "deadline_s": deadline_s},
            timeout=deadline_s + 5))

    async def guest_ping(self, uuid: str, deadline_s: float = 2.0) -> dict[str, float]:
        return await self._call("POST", f"/v1/vms/{uuid}/guest/ping", params={"deadline_s": deadline_s},
                                timeout=deadline_s + 5)

    async def guest_clock_sync(self, uuid: str, deadline_s: float = 2.0, set_allowance_s: float = 3.0,
                               step_ms: float = CLOCK_STEP_MS) -> GuestClock:
        req = ClockSyncRequest(deadline_s=deadline_s, set_allowance_s=set_allowance_s, step_ms=step_ms)
        return GuestClock.model_validate(await self._call("POST", f"/v1/vms/{uuid}/guest/clock-sync",
                                                          req.model_dump(), timeout=deadline_s + 2 * set_allowance_s + 5))

    async def power(self, uuid: str, action: str, req: PowerRequest) -> PowerOpResult:
        """``action``: shutdown | reboot; the agent waits up to ``req.timeout_s`` for the guest."""
        return PowerOpResult.model_validate(await self._call("POST", f"/v1/vms/{uuid}/{action}", req.model_dump(),
                                                             timeout=req.timeout_s + 30))
