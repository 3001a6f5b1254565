"""Disk passphrases wrapped to their host: round trip, refused for another host or disk, the key file's mode, and
the controller's client wrapping every ``disk_keys`` it sends (what crosses the wire is never the passphrase)."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from kvmotion.common import hostauth, keywrap
from kvmotion.common.errors import InvalidInputError
from kvmotion.controller import agents as agents_mod
from test_checks_unit import spec as make_spec


def test_round_trip_and_binding_to_host_and_disk(tmp_path: Path) -> None:
    h1 = keywrap.HostKey.load_or_create(tmp_path / "h1", "h1")
    h2 = keywrap.HostKey.load_or_create(tmp_path / "h2", "h2")
    wrapped = keywrap.wrap(h1.public_b64, "h1", "disk0", "correct horse battery staple")
    assert keywrap.is_wrapped(wrapped) and "staple" not in wrapped
    assert h1.unwrap("disk0", wrapped) == "correct horse battery staple"
    for key, node in ((h2, "disk0"), (h1, "disk1")):
        with pytest.raises(InvalidInputError, match="not wrapped for host"):
            key.unwrap(node, wrapped)
    assert h1.unwrap("disk0", "plain") == "plain"                 # an older controller's value
    assert keywrap.HostKey.load_or_create(tmp_path / "h1", "h1").public_b64 == h1.public_b64
    assert (tmp_path / "h1" / keywrap.KEY_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / "h3").mkdir()
    os.symlink(tmp_path / "h1" / keywrap.KEY_FILE, tmp_path / "h3" / keywrap.KEY_FILE)
    with pytest.raises(OSError):
        keywrap.HostKey.load_or_create(tmp_path / "h3", "h3")      # never through a symlink
    assert keywrap.wrap_all(None, "h1", {"disk0": "x"}) == {"disk0": "x"}


def test_the_controller_never_sends_a_passphrase_in_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = keywrap.HostKey.load_or_create(tmp_path, "h1")
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:       # the agent's answer, signed as the agent does
        bodies.append(request.content)
        spec = json.loads(request.content)["spec"]
        body = json.dumps({"uuid": spec["uuid"], "name": spec["name"], "state": "running"}).encode()
        nonce = request.headers[hostauth.HEADER].split("nonce=")[1].split()[0]
        return httpx.Response(200, content=body, headers={
            "content-type": "application/json",
            hostauth.RESPONSE_HEADER: hostauth.sign_response("ab" * 32, nonce, 200, body)})

    real = httpx.AsyncClient

    class Client(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kw: object) -> None:
            kw.pop("verify", None)
            super().__init__(transport=httpx.MockTransport(handler), **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(agents_mod.httpx, "AsyncClient", Client)
    spec = make_spec()
    agent = agents_mod.AgentClient("h1", "http://198.18.0.11:8770", "ab" * 32, wrap_key=lambda: key.public_b64)
    assert asyncio.run(agent.start(spec, {"disk0": "luks passphrase 123"})).state == "running"
    sent = json.loads(bodies[0])["disk_keys"]["disk0"]
    assert b"luks passphrase 123" not in bodies[0] and key.unwrap("disk0", sent) == "luks passphrase 123"


def test_nbd_keys_are_wrapped_wherever_a_request_carries_them(tmp_path: Path) -> None:
    from kvmotion.agent.nbdtls import open_psk
    from kvmotion.models.nbd import NbdPsk
    key = keywrap.HostKey.load_or_create(tmp_path, "h2")
    psk = NbdPsk.new()
    body = {"targets": [{"disk_id": "disk0", "psk": psk.model_dump()}], "nbd_psk": psk.model_dump(),
            "disk_keys": {"disk0": "pass"}, "other": {"username": "x"}}
    assert keywrap.has_secrets(body) and not keywrap.has_secrets({"spec": {"name": "vm1"}, "disk_keys": {}})
    wire = keywrap.wrap_payload(key.public_b64, "h2", body)
    text = json.dumps(wire)
    assert psk.key not in text and "pass" not in text.replace("passphrase", "")
    assert wire["other"] == {"username": "x"}
    for sent in (wire["nbd_psk"], wire["targets"][0]["psk"]):
        opened = open_psk(key, NbdPsk.model_validate(sent))
        assert opened == psk                                    # the agent's copy for QEMU's keys.psk
    other = NbdPsk.model_validate({"username": "kvmotion-move-0123456789abcdef", "key": wire["nbd_psk"]["key"]})
    with pytest.raises(InvalidInputError, match="not wrapped for host"):
        open_psk(key, other)                                    # a wrapped key only opens for its own move
