"""Enrolling a host at an address where something answers that is not a kvmotion agent is the caller's mistake
(4xx naming the address), never a 5xx: a web server, or a transparent proxy that answers any port-80 address."""
from __future__ import annotations

import asyncio
import json
import http.server
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kvmotion.common import pinning

from kvmotion.common.errors import ErrorCode, InvalidInputError
from kvmotion.controller import db
from kvmotion.controller.inventory import Inventory

SECRET = "ab" * 32


def _server(status: int, body: bytes, ctype: str) -> http.server.ThreadingHTTPServer:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:   # noqa: N802
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    key = ec.generate_private_key(ec.SECP256R1())         # agents serve HTTPS only: so does the impostor
    (tmp := Path(tempfile.mkdtemp())).joinpath("c.pem").write_text(pinning.self_signed(key, "impostor", ["127.0.0.1"]))
    tmp.joinpath("k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    return srv


@pytest.fixture(params=[(404, b"Not Found", "text/plain"), (200, b"<html>hello</html>", "text/html"),
                        (200, b'{"hello": "world"}', "application/json"),
                        (403, b'{"detail": "Forbidden"}', "application/json")],
                ids=["404-text", "200-html", "200-json-not-facts", "403-json-not-ours"])
def impostor(request) -> Iterator[str]:
    srv = _server(*request.param)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def test_an_address_that_is_not_an_agent_is_bad_input(impostor: str, db_url: str) -> None:
    sessions = db.make_sessionmaker(db.make_engine(db_url))
    with pytest.raises(InvalidInputError, match="loopback"):          # not even asked: not a host network
        asyncio.run(Inventory(sessions).add_host(impostor, SECRET))
    inv = Inventory(sessions, host_networks=["127.0.0.0/8"])          # an all-in-one install allows it
    with pytest.raises(InvalidInputError) as err:
        asyncio.run(inv.add_host(impostor, SECRET))
    assert err.value.code == ErrorCode.INVALID_INPUT and "no kvmotion agent answers at" in err.value.message
    assert err.value.remedy and inv.list_hosts() == []
    said = json.dumps(err.value.to_dict())
    for remote in ("Not Found", "hello", "world", "Forbidden"):      # nothing the far end said is relayed (SSRF)
        assert remote not in said, said
