"""Calls from this controller to another one of its domain (``/api/v1/peer/…``): HTTPS with the other's pinned
CA as the only trust (``peertls``), this controller's peer client certificate when it is a member there, and a
deadline on every call. Its refusals come back as errors of this controller's API, with its message and remedy."""
from __future__ import annotations

import ssl
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from kvmotion.common import pinning
from kvmotion.common.errors import ConflictError, KvmotionError, PeerUnreachable
from kvmotion.common.http import untrusted
from kvmotion.controller.peertls import is_controller_api

DEADLINE_S = 15.0
T = TypeVar("T", bound=BaseModel)


class PeerClient:
    def __init__(self, url: str, tls: pinning.ClientTls | None) -> None:
        """``tls`` None: nothing is verified; only for ``GET /peer/ca``, whose answer the caller checks against the
        fingerprint its admin gave."""
        self.url = url.rstrip("/")
        self.tls = tls

    async def call(self, method: str, path: str, out: type[T], body: BaseModel | None = None,
                   deadline_s: float = DEADLINE_S) -> T:
        raw = await self.call_json(method, path, body, deadline_s)
        try:
            return out.model_validate(raw)
        except ValidationError as exc:
            raise self._foreign(method, path) from exc

    async def call_json(self, method: str, path: str, body: BaseModel | None = None,
                        deadline_s: float = DEADLINE_S) -> Any:
        verify: ssl.SSLContext | bool = pinning.client_context(self.tls) if self.tls is not None else False
        payload = body.model_dump(mode="json") if body is not None else None
        try:
            async with httpx.AsyncClient(verify=verify, timeout=deadline_s) as client:
                r = await client.request(method, f"{self.url}/api/v1{path}", json=payload)
                presented = pinning.peer_certificate(r.extensions)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if self.tls is not None and not is_controller_api(presented):
            raise PeerUnreachable(f"the certificate presented at {self.url} comes from the pinned CA but is not a "
                                  "controller's API certificate (one of its hosts'?)",
                                  remedy="check the URL: it must be the controller's own", details={"url": self.url})
        if r.status_code >= 400:
            raise self._refused(r)
        try:
            return r.json()
        except ValueError as exc:
            raise self._foreign(method, path) from exc

    def _foreign(self, method: str, path: str) -> PeerUnreachable:
        return PeerUnreachable(f"the controller at {self.url} answered {method} {path} with something else than "
                               "kvmotion's answer", remedy="run the same kvmotion version on both controllers",
                               details={"url": self.url})

    def _unreachable(self, exc: httpx.HTTPError) -> PeerUnreachable:
        details = {"url": self.url}
        if untrusted(exc):
            return PeerUnreachable(f"the controller at {self.url} presented a certificate its pinned CA did not "
                                   "issue", details=details,
                                   remedy="check the URL; a controller set up anew (another CA) must be removed "
                                          "here and join again")
        return PeerUnreachable(f"the controller at {self.url} did not answer: {type(exc).__name__}", details=details,
                               remedy="check that it runs and that this controller reaches that URL; a controller "
                                      "that no longer pins this one refuses its certificate (`kvmotion domain "
                                      "list` there)")

    def _refused(self, r: httpx.Response) -> KvmotionError:
        try:
            body: Any = r.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            err = {"message": f"HTTP {r.status_code}", "remedy": "run the same kvmotion version on both controllers"}
        message = f"the controller at {self.url} refused: {err.get('message', '')}"
        if r.status_code in (401, 403):       # it does not accept this controller: not the caller's token at fault
            return ConflictError(message, remedy=str(err.get("remedy", "")),
                                 details={"url": self.url, "status": r.status_code})
        return KvmotionError.from_dict({**err, "message": message})
