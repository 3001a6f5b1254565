"""A host of another controller as the engine's destination (``migration.ports.HostClient``).

Each call goes to the destination controller (``POST /api/v1/peer/moves/{id}/host``, mutual TLS), which relays
it to its own agent for this move's VM only and fills in what it decides itself (the VM's spec there, the peer
host's TLS identity, the listening address). Calls a move never makes on its destination are refused here.
"""
from __future__ import annotations

from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel

from kvmotion.common.errors import ConflictError
from kvmotion.controller.peerclient import PeerClient
from kvmotion.models.agent import IncomingReady, LeaseInfo, MigrationReport, VMRuntime, VMSpec
from kvmotion.models.crossmove import PeerHostCall
from kvmotion.models.guest import CLOCK_STEP_MS, GuestClock
from kvmotion.models.health import GuestHealth, HealthCheckRequest
from kvmotion.models.nbd import NbdPsk

T = TypeVar("T", bound=BaseModel)
RELAY_S = 10.0          # the destination controller's own hop, on top of its agent call's deadline


class PeerHostClient:
    def __init__(self, client: PeerClient, move_id: str, host: str) -> None:
        self.client, self.move_id, self.host = client, move_id, host

    async def _op(self, op: str, limit_s: float, /, **args: Any) -> Any:
        """``limit_s``: the agent call's own deadline there (``args`` may have a ``deadline_s`` of their own)."""
        return await self.client.call_json("POST", f"/peer/moves/{self.move_id}/host",
                                           PeerHostCall(op=op, args=args), deadline_s=limit_s + RELAY_S)  # type: ignore[arg-type]

    async def _model(self, out: type[T], op: str, limit_s: float, /, **args: Any) -> T:
        return out.model_validate(await self._op(op, limit_s, **args))

    async def status(self, uuid: str) -> VMRuntime:
        return await self._model(VMRuntime, "status", 8)

    async def prepare_incoming(self, spec: VMSpec, listen_address: str, tls_authz_identity: str | None = None,
                               disk_keys: dict[str, str] | None = None, new_disks: list[str] | None = None,
                               multifd_channels: int = 0, postcopy: bool = False,
                               nbd_psk: NbdPsk | None = None) -> IncomingReady:
        """The destination controller uses its own spec of the VM, and the source host's identity it was given
        at the reservation (``spec`` and ``tls_authz_identity`` are not sent)."""
        return await self._model(IncomingReady, "prepare_incoming", 45, listen_address=listen_address,
                                 new_disks=new_disks or [], multifd_channels=multifd_channels,
                                 nbd_psk=nbd_psk.model_dump(mode="json") if nbd_psk else None)

    async def abort_incoming(self, uuid: str) -> bool:
        return bool(await self._op("abort_incoming", 20))

    async def resume(self, uuid: str, announce: bool = False) -> dict[str, Any]:
        return dict(await self._op("resume", 20, announce=announce))

    async def announce(self, uuid: str) -> dict[str, Any]:
        return dict(await self._op("announce", 10))

    async def take_lease(self, uuid: str, expected_holder: str | None) -> LeaseInfo:
        return await self._model(LeaseInfo, "take_lease", 10)

    async def locks(self, uuid: str) -> dict[str, list[str]]:
        return dict(await self._op("locks", 8))

    async def put_home(self, spec: VMSpec, files: dict[str, str]) -> str:
        return str(await self._op("put_home", 60, files=files))

    async def remove_files(self, spec: VMSpec, disk_ids: list[str], home: bool) -> list[str]:
        return list(await self._op("remove_files", 60, disk_ids=disk_ids, home=home))

    async def migration(self, uuid: str, wait_s: float = 0.0, since: str | None = None) -> MigrationReport:
        return await self._model(MigrationReport, "migration", 5 + wait_s, wait_s=wait_s, since=since)

    async def health_check(self, uuid: str, req: HealthCheckRequest) -> GuestHealth:
        return await self._model(GuestHealth, "health_check", req.window_s + 10, **req.model_dump(mode="json"))

    async def guest_clock_sync(self, uuid: str, deadline_s: float = 2.0, set_allowance_s: float = 3.0,
                               step_ms: float = CLOCK_STEP_MS) -> GuestClock:
        return await self._model(GuestClock, "guest_clock_sync", deadline_s + 2 * set_allowance_s + 5,
                                 deadline_s=deadline_s, set_allowance_s=set_allowance_s, step_ms=step_ms)

    def __getattr__(self, name: str) -> Any:
        """Every other agent call: a move never makes it on its destination; across controllers it is refused."""
        if name.startswith("_"):
            raise AttributeError(name)

        async def refused(*_: Any, **__: Any) -> NoReturn:
            raise ConflictError(f"{name} is not relayed to a host of another controller",
                                remedy="report this bug: a cross-controller move made a call it never makes")
        return refused
