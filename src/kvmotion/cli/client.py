"""A small synchronous client for the controller API, used by the CLI, the demo and the tests."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from kvmotion.cli.config import default_token, default_url, trust_configured_ca
from kvmotion.common.errors import AgentUnreachable, KvmotionError
from kvmotion.common.http import tls_context, untrusted


class Client:
    def __init__(self, url: str | None = None, timeout: float = 60.0, token: str | None = None) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.timeout = timeout
        self._token = token if token is not None else default_token()
        trust_configured_ca()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def call(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self._send(method, path, json, params).json()

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[list[Any]]:
        """Each page of a paged list (GET /vms, /hosts, /tasks), following ``X-Next-Cursor`` to the last page."""
        asked = {k: v for k, v in (params or {}).items() if v is not None}
        while True:
            r = self._send("GET", path, None, asked)
            yield r.json()
            cursor = r.headers.get("X-Next-Cursor")
            if not cursor:
                return
            asked = asked | {"cursor": cursor}

    def every(self, path: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Every item of a paged list, all its pages read."""
        return [item for page in self.pages(path, params) for item in page]

    def _send(self, method: str, path: str, json: Any, params: dict[str, Any] | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            r = httpx.request(method, f"{self.url}/api/v1{path}", json=json, params=params, timeout=self.timeout,
                              headers=headers, verify=tls_context())
        except httpx.HTTPError as exc:
            if untrusted(exc):
                raise AgentUnreachable(f"the controller at {self.url} presented a certificate this client does not "
                                       "trust", remedy="name the controller's CA (its pki/ca-cert.pem): ca_file in "
                                       "the CLI config, or KVMOTION_CA_FILE") from exc
            raise AgentUnreachable(f"controller at {self.url} did not answer: {type(exc).__name__}",
                                   remedy="start it (`kvmotion lab up` in the lab) or pass --url") from exc
        if r.status_code >= 400:
            body: Any
            try:
                body = r.json()
            except ValueError:
                body = {}
            err = body.get("error") if isinstance(body, dict) else None
            if err:
                raise KvmotionError.from_dict(err)
            detail = body.get("detail") if isinstance(body, dict) else None
            raise KvmotionError(f"invalid request: {_validation_text(detail) if detail else r.text[:300]}",
                                remedy="fix the arguments named above")
        return r

    # convenience wrappers
    def hosts(self, cluster: str | None = None, state: str | None = None, view: str = "full",
              page_size: int | None = None) -> list[dict[str, Any]]:
        """Every host (each page read), or those of ``cluster`` / in ``state``; ``view="summary"``: without facts."""
        return self.every("/hosts", {"cluster": cluster, "state": state, "view": view, "limit": page_size})

    def host(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/hosts/{name}")

    def add_host(self, address: str, secret: str, name: str | None = None) -> dict[str, Any]:
        return self.call("POST", "/hosts", {"address": address, "secret": secret, "name": name})

    def pending_hosts(self) -> list[dict[str, Any]]:
        return self.call("GET", "/hosts/pending")

    def approve_host(self, name: str, fingerprint: str) -> dict[str, Any]:
        return self.call("POST", f"/hosts/{name}/approve", {"fingerprint": fingerprint})

    def reject_host(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/hosts/pending/{name}")

    def remove_host(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/hosts/{name}")

    def create_token(self, name: str, role: str, ttl_s: int | None = None) -> dict[str, Any]:
        return self.call("POST", "/tokens", {k: v for k, v in {"name": name, "role": role, "ttl_s": ttl_s}.items()
                                             if v is not None})

    def tokens(self) -> list[dict[str, Any]]:
        return self.call("GET", "/tokens")

    def revoke_token(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/tokens/{name}")

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.call("GET", "/audit", params={"limit": limit})

    def domain(self) -> dict[str, Any]:
        return self.call("GET", "/domain")

    def create_domain(self, name: str, controller_name: str | None, public_url: str | None) -> dict[str, Any]:
        return self.call("POST", "/domain", _given(name=name, controller_name=controller_name, public_url=public_url))

    def join_domain(self, url: str, fingerprint: str, controller_name: str | None,
                    public_url: str | None) -> dict[str, Any]:
        return self.call("POST", "/domain/join", _given(url=url, fingerprint=fingerprint,
                                                        controller_name=controller_name, public_url=public_url))

    def domain_members(self) -> list[dict[str, Any]]:
        return self.call("GET", "/domain/members")

    def approve_member(self, name: str, fingerprint: str) -> dict[str, Any]:
        return self.call("POST", f"/domain/members/{name}/approve", {"fingerprint": fingerprint})

    def reject_member(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/domain/pending/{name}")

    def ping_member(self, name: str) -> dict[str, Any]:
        return self.call("POST", f"/domain/members/{name}/ping")

    def remove_member(self, name: str, force: bool = False) -> dict[str, Any]:
        return self.call("DELETE", f"/domain/members/{name}", params={"force": force} if force else None)

    def leave_domain(self, force: bool = False) -> dict[str, Any]:
        return self.call("POST", "/domain/leave", {"force": force})

    def vms(self, host: str | None = None, power_state: str | None = None, view: str = "full",
            page_size: int | None = None) -> list[dict[str, Any]]:
        """Every VM (each page read), or those of ``host`` / in ``power_state``; ``view="summary"``: without specs."""
        return self.every("/vms", {"host": host, "power_state": power_state, "view": view, "limit": page_size})

    def vm(self, ref: str, refresh_guest: bool = False) -> dict[str, Any]:
        return self.call("GET", f"/vms/{ref}", params={"refresh_guest": True} if refresh_guest else None)

    def create_vm(self, **fields: Any) -> dict[str, Any]:
        return self.call("POST", "/vms", {k: v for k, v in fields.items() if v is not None})

    def start_vm(self, ref: str) -> dict[str, Any]:
        return self.call("POST", f"/vms/{ref}/start")

    def stop_vm(self, ref: str) -> dict[str, Any]:
        return self.call("POST", f"/vms/{ref}/stop")

    def delete_vm(self, ref: str) -> dict[str, Any]:
        return self.call("DELETE", f"/vms/{ref}")

    def migrate(self, ref: str, host: str | None = None, **opts: Any) -> dict[str, Any]:
        body = {"host": host, **opts}
        return self.call("POST", f"/vms/{ref}/migrate", {k: v for k, v in body.items() if v not in (None, {})})

    def validate(self, ref: str, host: str | None = None, **opts: Any) -> list[dict[str, Any]]:
        body = {"host": host, **opts}
        return self.call("POST", f"/vms/{ref}/migrate/validate", {k: v for k, v in body.items() if v not in (None, {})})

    def cdrom(self, ref: str, drive: str, media: str, path: str | None = None, nbd: str | None = None,
              datastore: str | None = None) -> dict[str, Any]:
        body = {"drive": drive, "media": media, "path": path, "nbd": nbd, "datastore": datastore}
        return self.call("POST", f"/vms/{ref}/cdrom", {k: v for k, v in body.items() if v is not None})

    def update_vm(self, ref: str, **fields: Any) -> dict[str, Any]:
        return self.call("PATCH", f"/vms/{ref}", {k: v for k, v in fields.items() if v is not None})

    def cert_renew(self, host: str) -> dict[str, Any]:
        return self.call("POST", f"/hosts/{host}/cert/renew")

    def cert_remove(self, host: str) -> dict[str, Any]:
        return self.call("DELETE", f"/hosts/{host}/cert")

    def maintenance(self, host: str, enter: bool) -> dict[str, Any]:
        return self.call("POST", f"/hosts/{host}/maintenance", {"enter": enter})

    def clusters(self) -> list[dict[str, Any]]:
        return self.call("GET", "/clusters")

    def create_cluster(self, name: str, evc_mode: str | None = None) -> dict[str, Any]:
        return self.call("POST", "/clusters", {"name": name, "evc_mode": evc_mode})

    def cluster_add_host(self, name: str, host: str) -> dict[str, Any]:
        return self.call("POST", f"/clusters/{name}/hosts/{host}")

    def evc_modes(self, name: str) -> list[str]:
        return self.call("GET", f"/clusters/{name}/evc-modes")

    def set_evc(self, name: str, mode: str | None) -> dict[str, Any]:
        return self.call("PUT", f"/clusters/{name}/evc", {"name": name, "evc_mode": mode})

    def images(self) -> list[dict[str, Any]]:
        return self.call("GET", "/images")

    def image(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/images/{name}")

    def import_image(self, name: str, file: str, datastore: str, host: str | None = None) -> dict[str, Any]:
        body = {"name": name, "file": file, "datastore": datastore, "host": host}
        return self.call("POST", "/images", {k: v for k, v in body.items() if v is not None})

    def delete_image(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/images/{name}")

    def import_ovf(self, file: str, host: str, datastore: str, name: str | None = None,
                   network: str | None = None) -> dict[str, Any]:
        body = {"file": file, "host": host, "datastore": datastore, "name": name, "network": network}
        return self.call("POST", "/vms/import-ovf", {k: v for k, v in body.items() if v is not None})

    def shutdown_vm(self, ref: str, timeout_s: float = 120.0, force: bool = False) -> dict[str, Any]:
        """Graceful: waits up to ``timeout_s`` for the guest (this call's own HTTP deadline is longer)."""
        return self._power(ref, "shutdown", timeout_s, force)

    def reboot_vm(self, ref: str, timeout_s: float = 120.0, force: bool = False) -> dict[str, Any]:
        return self._power(ref, "reboot", timeout_s, force)

    def _power(self, ref: str, action: str, timeout_s: float, force: bool) -> dict[str, Any]:
        waiting = Client(self.url, timeout=max(self.timeout, timeout_s + 60), token=self._token)
        return waiting.call("POST", f"/vms/{ref}/{action}", {"timeout_s": timeout_s, "force": force})

    def guest(self, ref: str, refresh: bool = True) -> dict[str, Any]:
        return self.call("GET", f"/vms/{ref}/guest", params={"refresh": refresh})

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/tasks/{task_id}/cancel")

    def force_complete(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/tasks/{task_id}/force-complete")

    def task(self, task_id: str) -> dict[str, Any]:
        return self.call("GET", f"/tasks/{task_id}")

    def tasks(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.call("GET", "/tasks", params={"limit": limit})


def _given(**fields: Any) -> dict[str, Any]:
    """The fields of a request body that were given (None: left to the controller)."""
    return {k: v for k, v in fields.items() if v is not None}


def _validation_text(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        for d in detail:
            loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
            parts.append(f"{loc}: {d.get('msg')}")
        return "; ".join(parts)
    return str(detail)
