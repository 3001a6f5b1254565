"""Reproducer, with plain QMP and no kvmotion code: QEMU 7.2 under TCG corrupts a guest during live migration
when the guest receives network traffic (virtio-net RX) while memory is pre-copied.

Usage (root, Debian 12 QEMU 7.2, after `kvmotion image build`):  python3 benchmarks/tcg_rx_migration_repro.py a tcg 30
Run several chains at once (a, b, c, ...) for load. Each iteration migrates the guest to a fresh QEMU over a unix
socket (pause-before-switchover, return-path, announce) while a host loop sends HTTP requests to it through a slirp
hostfwd; it prints OK, or BAD with the guest's console when the kernel oopses or stops. Measured here: without the
traffic 0 failures in 362 migrations; with it 2 in 112; with mrg_rxbuf=off,event_idx=off 3 in 18.
"""
import asyncio, subprocess, sys, os, glob
from qemu.qmp import QMPClient
IMG = sorted(glob.glob("/var/lib/kvmotion/image/*/manifest.json"))[-1].rsplit("/", 1)[0]
BASE = ["qemu-system-x86_64", "-machine", "pc-q35-7.2", "-accel", sys.argv[2] if len(sys.argv) > 2 else "tcg",
        "-cpu", "qemu64", "-m", "128", "-smp", "1", "-nodefaults", "-display", "none",
        "-kernel", f"{IMG}/vmlinuz", "-initrd", f"{IMG}/initrd.img", "-append", "console=ttyS0 quiet panic=-1 kvmotion.ip=198.18.9.9/24"]
chain = sys.argv[1]
PORTBASE = 20000 + 200 * (ord(chain) - ord("a"))
d = f"/tmp/rawmig/{chain}"; os.makedirs(d, exist_ok=True)

async def start(n, incoming):
    sock = f"{d}/q{n}.sock"; ser = f"{d}/s{n}.log"
    for f in (sock,):
        if os.path.exists(f): os.unlink(f)
    disk = f"{d}/disk.qcow2"
    if not os.path.exists(disk):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"], check=True)
    argv = BASE + ["-blockdev", '{"node-name":"d0","driver":"qcow2","file":{"driver":"file","filename":"%s"}}' % disk,
                   "-device", "virtio-blk-pci,drive=d0,id=disk0",
                   "-netdev", f"user,id=n0,net=198.18.250.0/24,host=198.18.250.2,hostfwd=tcp:127.0.0.1:{PORTBASE + n}-198.18.9.9:80", "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:11:22:33",
                   "-device", "ide-cd,id=cd0,bus=ide.0",
                   "-serial", f"file:{ser}", "-qmp", f"unix:{sock},server=on,wait=off"] + (["-incoming", "defer", "-S"] if incoming else [])
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(f"{d}/q{n}.err", "w"))
    c = QMPClient(f"q{n}")
    for _ in range(100):
        try:
            await c.connect(sock); break
        except Exception:
            c = QMPClient(f"q{n}"); await asyncio.sleep(0.05)
    return p, c, ser

def caps(d): return {"capabilities": [{"capability": k, "state": v} for k, v in d.items()]}

async def main():
    n = 0
    p, c, ser = await start(n, False)
    await asyncio.sleep(15)
    for it in range(int(sys.argv[3]) if len(sys.argv) > 3 else 40):
        n += 1
        p2, c2, ser2 = await start(n, True)
        await c2.execute("migrate-set-capabilities", caps({"events": True, "late-block-activate": True, "return-path": True}))
        uri = f"unix:{d}/mig{n}.sock"
        with c2.listener("MIGRATION") as l2:
            await c2.execute("migrate-incoming", {"uri": uri})
            await c.execute("migrate-set-capabilities", caps({"events": True, "return-path": True, "pause-before-switchover": True}))
            await c.execute("migrate-set-parameters", {"max-bandwidth": 31250000, "downtime-limit": 50})
            async def poll(cl, period):
                try:
                    while True:
                        await cl.execute("query-migrate"); await asyncio.sleep(period)
                except Exception:
                    pass
            async def traffic(port):
                while True:
                    try:
                        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                        w.write(b"GET /cgi-bin/heartbeat HTTP/1.0\r\n\r\n"); await w.drain()
                        await asyncio.wait_for(r.read(), 1); w.close()
                    except Exception:
                        pass
                    await asyncio.sleep(0.02)
            pollers = [asyncio.create_task(poll(c, 0.1)), asyncio.create_task(poll(c2, 0.5)),
                       asyncio.create_task(traffic(PORTBASE + n - 1))]
            with c.listener("MIGRATION") as l:
                await c.execute("migrate", {"uri": uri})
                while True:
                    ev = await asyncio.wait_for(l.get(), 30)
                    if ev["data"]["status"] == "pre-switchover":
                        await c.execute("migrate-continue", {"state": "pre-switchover"}); break
                    if ev["data"]["status"] in ("failed", "cancelled"): raise SystemExit(f"failed {ev}")
            while True:
                ev = await asyncio.wait_for(l2.get(), 30)
                if ev["data"]["status"] == "completed":
                    for _ in range(200):
                        st = (await c2.execute("query-status"))["status"]
                        if st != "inmigrate":
                            break
                        await asyncio.sleep(0.005)
                    if _ > 0: print("waited", _, st, flush=True)
                    await c2.execute("cont")
                    await c2.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}); break
                if ev["data"]["status"] in ("failed",): raise SystemExit("dst failed")
        for t in pollers: t.cancel()
        await c.execute("quit"); p.wait()
        try:
            await c.disconnect()
        except Exception:
            pass
        p, c, ser = p2, c2, ser2
        await asyncio.sleep(3.5)
        txt = open(ser, errors="replace").read()
        bad = ("BUG:" in txt) or ("panic" in txt) or ("KVMOTION-HEARTBEAT" not in txt)
        print(chain, it, "OK" if not bad else "BAD", (await c.execute("query-status")), [b.get("io-status") for b in await c.execute("query-block")], flush=True)
        if bad:
            print(txt[-1500:]); break
    await c.execute("quit"); p.wait()
asyncio.run(main())
