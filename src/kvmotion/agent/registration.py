"""The agent's registration with its controller (an enrolment token, single-use): it retries until the controller
answers, with backoff, saying why it waits; then the host waits for an admin's approval on the controller.

Once answered, the outcome is kept in the state directory (``registration.json``, 0600) with a digest of the
token: a restart does not register again with a used token; a new token file registers again. The host's
fingerprint is logged at every start: the admin compares it with the one ``kvmotion host pending`` shows.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from kvmotion.agent.config import AgentConfig
from kvmotion.common.hostid import fingerprint
from kvmotion.common.http import tls_context

log = logging.getLogger("kvmotion.agent")
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STATE_FILE = "registration.json"
CALL_DEADLINE_S = 30.0       # the controller probes this agent back before it answers


def _state(cfg: AgentConfig) -> dict[str, Any]:
    try:
        fd = os.open(cfg.state_dir / STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd) as fh:
        try:
            data = json.load(fh)
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def _save(cfg: AgentConfig, data: dict[str, Any]) -> None:
    tmp = cfg.state_dir / f"{STATE_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, cfg.state_dir / STATE_FILE)


def _error_of(r: httpx.Response) -> tuple[str, str]:
    try:
        err = r.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    return str(err.get("message") or f"HTTP {r.status_code}"), str(err.get("remedy") or "")


def controller_tls(cfg: AgentConfig) -> ssl.SSLContext:
    """Only the controller's own CA when the config names it (else the system's CAs)."""
    if cfg.controller_ca_file is not None:
        return ssl.create_default_context(cafile=str(cfg.controller_ca_file))
    return tls_context()


async def register(cfg: AgentConfig, secret: str, transport: httpx.AsyncBaseTransport | None = None,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> str:
    """Register until the controller answers; returns pending | enrolled | refused | skipped."""
    fp = fingerprint(secret)
    log.info("host %s fingerprint %s", cfg.name, fp)
    if not cfg.controller_url:
        return "skipped"
    token_file: Path | None = cfg.enrol_token_file
    if token_file is None or not token_file.exists():
        log.warning("not registering with %s: no enrolment token file configured (enrol_token_file); "
                    "an admin can add this host with `kvmotion host add`", cfg.controller_url)
        return "skipped"
    if cfg.controller_ca_file is not None and not cfg.controller_ca_file.is_file():
        log.error("not registering with %s: controller_ca_file %s does not exist; fix: copy the controller's "
                  "pki/ca-cert.pem there", cfg.controller_url, cfg.controller_ca_file)
        return "refused"
    token = token_file.read_text().strip()
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    done = _state(cfg)
    if done.get("controller_url") == cfg.controller_url and done.get("token") == digest:
        log.info("registered with %s before (%s): not again with the same token", cfg.controller_url, done["state"])
        return str(done["state"])
    body = {"name": cfg.name, "address": cfg.url, "secret": secret}
    for attempt in range(10 ** 9):
        try:
            async with httpx.AsyncClient(timeout=CALL_DEADLINE_S, transport=transport,
                                         verify=controller_tls(cfg)) as client:
                r = await client.post(f"{cfg.controller_url}/api/v1/hosts/register", json=body,
                                      headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            why = f"the controller does not answer ({type(exc).__name__})"
        else:
            if r.status_code < 400:
                state = str(r.json().get("state", "enrolled"))
                _save(cfg, {"controller_url": cfg.controller_url, "token": digest, "state": state})
                if state == "pending":
                    log.warning("registered with %s; waiting for an admin: kvmotion host approve %s --fingerprint %s",
                                cfg.controller_url, cfg.name, fp)
                return state
            if r.status_code < 500 and r.status_code != 429:
                message, remedy = _error_of(r)
                log.error("the controller refused the registration of %s (%s): %s%s", cfg.name, r.status_code,
                          message, f"; fix: {remedy}" if remedy else "")
                return "refused"
            why = f"the controller answered {r.status_code}: {_error_of(r)[0]}"
        delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        log.warning("registration with %s waits: %s; next try in %.0f s", cfg.controller_url, why, delay)
        await sleep(delay)
    return "refused"
