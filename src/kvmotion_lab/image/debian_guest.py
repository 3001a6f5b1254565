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

The record writer and the marker of the tiny guest are not implemented here.
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import socket
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


def _handler(guest: Guest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/cgi-bin/heartbeat", "/heartbeat"):
                body, ctype = (json.dumps(guest.beat()) + "\n").encode(), "application/json"
            elif self.path == "/":
                body, ctype = (f"kvmotion debian guest {socket.gethostname()}\nboot_id {guest.boot_id}\n"
                               f"endpoints: /cgi-bin/heartbeat (JSON), /heartbeat\n").encode(), "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass
    return Handler


def cmd_heartbeat() -> int:
    guest = Guest(oem_settings(read_oem_strings()))
    server = ThreadingHTTPServer(("", 80), _handler(guest))
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
