"""The kvmotion service inside the Debian guest (copied verbatim into the image; python3 stdlib only).

Two commands, each run by a systemd unit of the image:

* ``net`` (``kvmotion-net.service``, oneshot, before ``systemd-networkd``): reads the SMBIOS type 11 OEM strings
  (``/sys/firmware/dmi/entries/11-*/raw``) and, when ``kvmotion:ip=A.B.C.D/NN`` is there, writes
  ``/run/systemd/network/05-kvmotion-static.network`` (a static address, ``kvmotion:gw=`` and ``kvmotion:dns=``
  optional); without it ``/etc/systemd/network/99-kvmotion-dhcp.network`` (DHCP) applies.  ``kvmotion:hostname=``
  sets the host name.
* ``heartbeat`` (``kvmotion-heartbeat.service``): the tiny guest's contract (see
  :mod:`kvmotion_lab.image.guest_init`): HTTP on port 80 (``/cgi-bin/heartbeat`` and ``/heartbeat`` answer the JSON,
  ``/`` a text page), ``KVMOTION-IDENTITY``, ``KVMOTION-READY`` and ``KVMOTION-HEARTBEAT`` lines on ``/dev/ttyS0``,
  and a memory dirtier (``kvmotion:dirty=R`` MB/s, ``kvmotion:dirty_region=M`` MB).  It also prints
  ``KVMOTION-CLOUDINIT status=S`` once cloud-init has finished and puts ``cloud_init`` in the JSON.

  Two more services on the same port, for the benchmarks and tests:

  - **a bank** (SQLite on the guest's disk, WAL, ``synchronous=FULL``): ``POST /bank/tx?client=C&seq=N`` moves an
    amount between two of 100 accounts and records it in a ledger, in one transaction, committed before the reply;
    a retried ``(client, seq)`` is not applied twice.  ``GET /bank/check?client=C`` returns the ledger's rows, the
    total of all balances (constant when no transaction was torn), SQLite's ``quick_check`` and the client's
    committed sequence numbers;
  - **an EFI variable** (UEFI guests, through efivarfs): ``PUT /efivar/NAME`` with a text body sets
    ``NAME-<KVMOTION_VENDOR>`` (non-volatile), ``GET /efivar/NAME`` reads it back (404 when unset).

The record writer and the marker of the tiny guest are not implemented here.
"""
from __future__ import annotations

import fcntl
import glob
import ipaddress
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

OEM_PREFIX = "kvmotion:"
STATIC_NETWORK = "/run/systemd/network/05-kvmotion-static.network"
TICK_S = 0.1
PRINT_EVERY = 10
BANK_DB = "/var/lib/kvmotion-guest/bank.db"
BANK_ACCOUNTS = 100
BANK_OPENING = 1000
EFIVARS = "/sys/firmware/efi/efivars"
KVMOTION_VENDOR = "6b766d6f-7469-6f6e-8000-000000000001"
EFI_NV_BS_RT = 0x7
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def parse_oem_raw(raw: bytes) -> list[str]:
    """The strings of one SMBIOS type 11 structure (``/sys/firmware/dmi/entries/11-N/raw``), in order."""
    if len(raw) < 5 or raw[0] != 11:
        return []
    count, strings = raw[4], raw[raw[1]:]
    out = [s.decode("utf-8", "replace") for s in strings.split(b"\0")]
    return [s for s in out if s][:count]


def oem_settings(strings: list[str]) -> dict[str, str]:
    """``kvmotion:KEY=VALUE`` strings as a dict (the last wins); everything else is ignored."""
    found: dict[str, str] = {}
    for s in strings:
        if s.startswith(OEM_PREFIX) and "=" in s:
            key, _, value = s[len(OEM_PREFIX):].partition("=")
            found[key.strip()] = value.strip()
    return found


def read_oem_strings(pattern: str = "/sys/firmware/dmi/entries/11-*/raw") -> list[str]:
    strings: list[str] = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, "rb") as fh:
                strings += parse_oem_raw(fh.read())
        except OSError:
            continue
    return strings


def render_static_network(settings: dict[str, str]) -> str | None:
    """The systemd-networkd file for ``kvmotion:ip`` (None without it); raises ValueError on a malformed value."""
    ip = settings.get("ip")
    if not ip:
        return None
    iface = ipaddress.IPv4Interface(ip if "/" in ip else f"{ip}/24")
    lines = ["[Match]", "Name=en* eth*", "", "[Network]", f"Address={iface.ip}/{iface.network.prefixlen}",
             "LinkLocalAddressing=no", "IPv6AcceptRA=no"]
    if settings.get("gw"):
        lines.append(f"Gateway={ipaddress.IPv4Address(settings['gw'])}")
    for dns in filter(None, settings.get("dns", "").split(",")):
        lines.append(f"DNS={ipaddress.ip_address(dns.strip())}")
    return "\n".join(lines) + "\n"


def cmd_net() -> int:
    settings = oem_settings(read_oem_strings())
    try:
        text = render_static_network(settings)
    except ValueError as exc:
        print(f"kvmotion-net: bad OEM string: {exc}; using DHCP", file=sys.stderr)
        text = None
    if text:
        os.makedirs(os.path.dirname(STATIC_NETWORK), exist_ok=True)
        with open(STATIC_NETWORK + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(STATIC_NETWORK + ".tmp", STATIC_NETWORK)
        print(f"kvmotion-net: static {settings['ip']}")
    host = settings.get("hostname", "")
    if host and all(c.isalnum() or c in ".-" for c in host):
        socket.sethostname(host)
    return 0


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _dmi(field: str) -> str:
    value = _read(f"/sys/class/dmi/id/{field}").lower()
    return "".join(c for c in value if c.isalnum() or c in "._:-")


def _macs() -> list[str]:
    out = []
    for d in sorted(glob.glob("/sys/class/net/*")):
        if os.path.basename(d) != "lo" and (mac := _read(f"{d}/address").lower()):
            out.append(mac)
    return out


def _ipv4() -> str:
    try:
        res = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=5, check=False)
        for link in json.loads(res.stdout or "[]"):
            for a in link.get("addr_info", []):
                return str(a["local"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError):
        pass
    return "none"


class Guest:
    """The heartbeat state: a tick thread advances ``seq``, the HTTP handler reads :meth:`beat`."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.boot_id = _read("/proc/sys/kernel/random/boot_id")
        self.dirty = max(0.0, float(settings.get("dirty", "0") or 0))
        self.region_mb = max(1, int(settings.get("dirty_region", "64") or 64))
        self.seq = 0
        self.dirtied_mb = 0.0
        self.ip = "none"
        self.cloud_init = "running"
        self.smbios_uuid, self.smbios_serial, self.macs = _dmi("product_uuid"), _dmi("product_serial"), _macs()
        self.console = self._open_console()
        self.say_lock = threading.Lock()

    @staticmethod
    def _open_console() -> TextIO:
        return open("/dev/ttyS0", "w", buffering=1) if os.path.exists("/dev/ttyS0") else sys.stdout

    def say(self, line: str) -> None:
        """One line on the serial console; reopened once when a hangup (a getty's vhangup) revoked it."""
        with self.say_lock:
            for _ in range(2):
                try:
                    self.console.write(line + "\n")
                    self.console.flush()
                    return
                except OSError:
                    try:
                        self.console = self._open_console()
                    except OSError:
                        return

    def uptime(self) -> float:
        return float(_read("/proc/uptime").split()[0] or 0)

    def beat(self) -> dict[str, object]:
        return {"seq": self.seq, "uptime": self.uptime(), "boot_id": self.boot_id, "hostname": socket.gethostname(),
                "dirty_mb_s": self.dirty, "dirtied_mb": int(self.dirtied_mb), "ip": self.ip, "records_acked": 0,
                "smbios_uuid": self.smbios_uuid, "smbios_serial": self.smbios_serial, "macs": self.macs,
                "cloud_init": self.cloud_init}

    def tick_forever(self) -> None:
        region = bytearray(self.region_mb << 20) if self.dirty else bytearray()
        chunk = min(len(region), int(self.dirty * TICK_S * (1 << 20)))
        src, off = os.urandom(chunk), 0
        nxt = time.monotonic()
        while True:
            self.seq += 1
            if chunk:
                end = min(off + chunk, len(region))
                region[off:end] = src[:end - off]
                self.dirtied_mb += (end - off) / (1 << 20)
                off = end % len(region)
            if self.seq % PRINT_EVERY == 0:
                self.say(f"KVMOTION-HEARTBEAT seq={self.seq} uptime={self.uptime():.2f} boot_id={self.boot_id}")
                if self.ip == "none":
                    self.ip = _ipv4()
            nxt = max(nxt + TICK_S, time.monotonic() - 2.0)   # paused (migration, TCG): no burst to catch up
            time.sleep(max(0.0, nxt - time.monotonic()))

    def watch_cloud_init(self) -> None:
        try:
            res = subprocess.run(["cloud-init", "status", "--wait"], capture_output=True, text=True, timeout=900,
                                 check=False)
            status = (res.stdout.strip().splitlines() or ["status: unknown"])[-1].split(":")[-1].strip()
        except (OSError, subprocess.TimeoutExpired):
            status = "unknown"
        self.cloud_init = status
        self.say(f"KVMOTION-CLOUDINIT status={status}")


class Bank:
    """The transaction workload: a ledger and 100 accounts whose total never changes."""

    def __init__(self, path: str = BANK_DB) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, client TEXT NOT NULL, "
                       "seq INTEGER NOT NULL, src INTEGER, dst INTEGER, amount INTEGER, at REAL, "
                       "UNIQUE (client, seq))")
            if db.execute("SELECT count(*) FROM account").fetchone()[0] == 0:
                db.executemany("INSERT INTO account VALUES (?, ?)",
                               [(i, BANK_OPENING) for i in range(BANK_ACCOUNTS)])

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def tx(self, client: str, seq: int) -> dict[str, object]:
        src, dst = seq % BANK_ACCOUNTS, (seq * 7 + 3) % BANK_ACCOUNTS
        amount = 1 + seq % 10
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM ledger WHERE client = ? AND seq = ?", (client, seq)).fetchone()
            if row is None:
                cur = db.execute("INSERT INTO ledger (client, seq, src, dst, amount, at) VALUES (?, ?, ?, ?, ?, ?)",
                                 (client, seq, src, dst, amount, time.time()))
                db.execute("UPDATE account SET balance = balance - ? WHERE id = ?", (amount, src))
                db.execute("UPDATE account SET balance = balance + ? WHERE id = ?", (amount, dst))
                row = (cur.lastrowid,)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return {"id": row[0], "client": client, "seq": seq}

    def check(self, client: str) -> dict[str, object]:
        db = self._db()
        try:
            seqs = [r[0] for r in db.execute("SELECT seq FROM ledger WHERE client = ? ORDER BY seq", (client,))]
            return {"rows": db.execute("SELECT count(*) FROM ledger").fetchone()[0],
                    "total": db.execute("SELECT sum(balance) FROM account").fetchone()[0],
                    "expected_total": BANK_ACCOUNTS * BANK_OPENING,
                    "quick_check": db.execute("PRAGMA quick_check").fetchone()[0], "seqs": seqs}
        finally:
            db.close()


def efivar_path(name: str) -> str:
    if not name or not all(c.isalnum() or c in "_-" for c in name) or len(name) > 64:
        raise ValueError(f"bad EFI variable name {name!r}")
    return f"{EFIVARS}/{name}-{KVMOTION_VENDOR}"


def efivar_set(name: str, value: bytes) -> None:
    """A non-volatile variable through efivarfs: 4 bytes of attributes, then the data."""
    path = efivar_path(name)
    if os.path.exists(path):                      # efivarfs makes files immutable; rewriting needs the flag off
        fd = os.open(path, os.O_RDONLY)
        try:
            flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~FS_IMMUTABLE_FL))
        finally:
            os.close(fd)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<I", EFI_NV_BS_RT) + value)


def efivar_get(name: str) -> bytes | None:
    try:
        with open(efivar_path(name), "rb") as fh:
            return fh.read()[4:]
    except FileNotFoundError:
        return None


def _query(path: str) -> tuple[str, dict[str, str]]:
    route, _, qs = path.partition("?")
    return route, dict(kv.partition("=")[::2] for kv in qs.split("&") if kv)


def _handler(guest: Guest, bank: Bank) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: object, code: int = 200) -> None:
            self._reply(code, (json.dumps(obj) + "\n").encode())

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route, q = _query(self.path)
            if route in ("/cgi-bin/heartbeat", "/heartbeat"):
                self._json(guest.beat())
            elif route == "/":
                self._reply(200, (f"kvmotion debian guest {socket.gethostname()}\nboot_id {guest.boot_id}\n"
                                  "endpoints: /heartbeat, /bank/tx, /bank/check, /efivar/NAME\n").encode(),
                            "text/plain")
            elif route == "/bank/check":
                self._json(bank.check(q.get("client", "")))
            elif route.startswith("/efivar/"):
                try:
                    value = efivar_get(route[len("/efivar/"):])
                except (ValueError, OSError) as exc:
                    return self._json({"error": str(exc)}, 400)
                if value is None:
                    return self._json({"error": "not set"}, 404)
                self._json({"value": value.decode("utf-8", "replace")})
            else:
                self.send_error(404)

        def do_POST(self) -> None:  # noqa: N802
            route, q = _query(self.path)
            if route != "/bank/tx":
                return self.send_error(404)
            try:
                self._json(bank.tx(q.get("client", "anon"), int(q.get("seq", "0"))))
            except (ValueError, sqlite3.Error) as exc:
                self._json({"error": f"{type(exc).__name__}: {exc}"}, 500)

        def do_PUT(self) -> None:  # noqa: N802
            route, _q = _query(self.path)
            if not route.startswith("/efivar/"):
                return self.send_error(404)
            body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1024))
            try:
                efivar_set(route[len("/efivar/"):], body)
            except (ValueError, OSError) as exc:
                return self._json({"error": f"{type(exc).__name__}: {exc}"}, 400)
            self._json({"value": body.decode("utf-8", "replace")})

        def log_message(self, *args: object) -> None:
            pass
    return Handler


def cmd_heartbeat() -> int:
    guest = Guest(oem_settings(read_oem_strings()))
    server = ThreadingHTTPServer(("", 80), _handler(guest, Bank()))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    guest.say(f"KVMOTION-IDENTITY uuid={guest.smbios_uuid or 'none'} serial={guest.smbios_serial or 'none'}")
    if guest.dirty:
        guest.say(f"KVMOTION-DIRTIER rate={guest.dirty:g} region={guest.region_mb}")
    end = time.monotonic() + 15
    while (ip := _ipv4()) == "none" and time.monotonic() < end:
        time.sleep(0.5)
    guest.ip = ip
    guest.say(f"KVMOTION-READY ip={ip}")
    threading.Thread(target=guest.watch_cloud_init, daemon=True).start()
    guest.tick_forever()
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["net"]:
        return cmd_net()
    if argv[1:] == ["heartbeat"]:
        return cmd_heartbeat()
    print("usage: kvmotion_guest.py net|heartbeat", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
