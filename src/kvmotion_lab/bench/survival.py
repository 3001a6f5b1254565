"""`kvmotion bench guest-survival`: how often does a guest break when it is live-migrated, and by whose fault?

Every arm moves the same guests (kvmotion's argv, 256 MiB, dirtying 20 MB/s, each pinged every 10 ms and polled
over HTTP from the client namespace) back and forth between two lab hosts, ``guests`` at once, until ``moves``
moves are done. Arms:

- ``A``: a plain ``migrate`` with QEMU's defaults (no agent, no controller: ``bench.rawqemu``);
- ``B``: kvmotion's QMP sequence without kvmotion (``rawqemu.KVMOTION_RECIPE``);
- ``C``: kvmotion itself (controller + agents), TLS as its default policy decides; ``C-plain``: encryption off;
- ``D-…``: ``B`` with one choice toggled (``D-no-auto-converge``, ``D-qemu-bandwidth``, ...), or ``A`` with one
  choice added (``A+auto-converge``, ...); ``D-ram-pad`` / ``A-ram-pad``: guest RAM 8 KiB above its MiB size, which
  kvmotion uses under TCG (``agent.hv.qemu.argv.guest_ram``) to avoid QEMU 7.2's lost-write bug. The raw arms run with the
  exact size unless they say ``ram-pad``.

After every round each guest must answer over HTTP with the same boot and a heartbeat that went up; a guest that
does not is a failure of its kind (rebooted, hung, network dead, heartbeat stalled, oops) with its console trace,
and is replaced. Results: JSON lines per move and a summary with 95 % Wilson intervals.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvmotion_lab.bench import rawqemu
from kvmotion_lab.bench.rawqemu import KVMOTION_RECIPE, Recipe
from kvmotion.cli.client import Client
from kvmotion.models.agent import VMSpec
from kvmotion_lab.image.build import build_image
from kvmotion_lab import lab, scenario
from kvmotion_lab.probe import ClientProbe

ROOT = Path("/tmp/kvmotion-survival")
BEAT_WAIT_S = 45.0
BOOT_WAIT_S = 300.0       # a guest booting on a starved host (many TCG guests on 2 cores) is slow, not broken
RAW_TOGGLES = ("auto_converge", "pause_before_switchover", "late_block_activate", "return_path", "announce_params",
               "announce_self")


def recipe_for(arm: str) -> Recipe | None:
    """The raw recipe of an arm; None for the arms that run kvmotion itself."""
    if arm == "A":
        return Recipe()
    if arm == "B":
        return KVMOTION_RECIPE
    if arm == "A-ram-pad":
        return Recipe(ram_pad_kib=8)
    if arm.startswith("A+"):
        field_ = arm[2:].replace("-", "_")
        value: Any = rawqemu.LINK_10G_BYTES if field_ == "max_bandwidth" else 50 if field_ == "downtime_ms" else True
        return Recipe().with_(field_, value)
    if arm.startswith("D-no-"):
        return KVMOTION_RECIPE.without(arm[5:].replace("-", "_"))
    extra = {"D-qemu-bandwidth": ("max_bandwidth", None), "D-qemu-downtime": ("downtime_ms", None),
             "D-xbzrle": ("xbzrle", True), "D-sampled": ("sample_dirty_rate", True),
             "D-tcg-multi": ("tcg_multi_thread", True), "D-ram-pad": ("ram_pad_kib", 8)}
    if arm in extra:
        return KVMOTION_RECIPE.with_(*extra[arm])
    if arm in ("C", "C-plain"):
        return None
    raise ValueError(f"unknown arm {arm!r}: use A, B, C, C-plain, A+FIELD, D-no-FIELD, "
                     f"D-qemu-bandwidth, D-qemu-downtime, D-xbzrle, D-sampled or D-tcg-multi")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = p + z * z / (2 * n)
    r = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (c - r) / d), min(1.0, (c + r) / d)


@dataclass
class Guest:
    name: str
    ip: str
    uuid: str
    host: str = "h1"
    boot_id: str = ""
    seq: int = -1
    raw: rawqemu.RawVM | None = None
    probe: ClientProbe | None = None
    moved_at: float = 0.0          # wall time the last move ended


def probe_beat(g: Guest) -> dict[str, Any] | None:
    """The newest heartbeat the guest's own client probe fetched after its last move ended, if it is newer than
    ``g``'s last one or from another boot. The probe polls all the time from the client namespace, so it is the
    client's view; a one-shot fetch that times out on a starved host is not."""
    if g.probe is None:
        return None
    newest = None
    try:
        with open(g.probe.out, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - (1 << 20)))
            for line in fh.read().decode(errors="replace").splitlines():
                if '"k": "hb"' not in line and '"k":"hb"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                data = rec.get("data")
                if isinstance(data, dict) and float(rec.get("t", 0)) > g.moved_at and "seq" in data:
                    newest = data
    except OSError:
        return None
    if newest is None or (int(newest["seq"]) <= g.seq and str(newest.get("boot_id")) == g.boot_id):
        return None
    return newest


@dataclass
class ArmResult:
    arm: str
    moves: int = 0
    broken: list[dict[str, Any]] = field(default_factory=list)
    move_failures: list[dict[str, Any]] = field(default_factory=list)
    guests_used: int = 0
    seconds: float = 0.0
    downtime_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lo, hi = wilson(len(self.broken), self.moves)
        kinds: dict[str, int] = {}
        for b in self.broken:
            kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
        return {"arm": self.arm, "moves": self.moves, "broken": len(self.broken), "rate": self.broken and
                len(self.broken) / self.moves or 0.0, "ci95": [round(lo, 4), round(hi, 4)], "kinds": kinds,
                "move_failures": len(self.move_failures), "guests_used": self.guests_used,
                "seconds": round(self.seconds, 1),
                "downtime_ms_p50": sorted(self.downtime_ms)[len(self.downtime_ms) // 2] if self.downtime_ms else None}


def last_console_beat(lines: list[str]) -> int | None:
    for line in reversed(lines):
        if line.startswith("KVMOTION-HEARTBEAT seq="):
            try:
                return int(line.split()[1].split("=", 1)[1])
            except (IndexError, ValueError):
                continue
    return None


def _thread_cpu_s(pid: int, tid: int) -> float | None:
    """CPU seconds a thread of ``pid`` used (utime + stime), or None."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def classify(before: Guest, beat: dict[str, Any] | None, console: list[str], console_later: list[str]) -> str | None:
    """None when the guest survived the move; else the kind of break."""
    if any(m in line for line in console + console_later for m in scenario.CRASH_MARKERS):
        return "oops"
    if beat is None:
        a, b = last_console_beat(console), last_console_beat(console_later)
        return "network-dead" if a is not None and b is not None and b > a else "hung"
    if str(beat["boot_id"]) != before.boot_id:
        return "rebooted"
    if int(beat["seq"]) <= before.seq:
        return "heartbeat-stalled"
    return None


def next_beat(client_netns: str, g: "Guest") -> dict[str, Any] | None:
    """A heartbeat newer than ``g``'s last one, or from another boot; waits up to BEAT_WAIT_S (a starved host is
    slow, not a break), then returns the last one seen (None: no answer)."""
    end = time.monotonic() + BEAT_WAIT_S
    last = None
    while time.monotonic() < end:
        hb = probe_beat(g) or scenario.guest_heartbeat(client_netns, g.ip)
        if hb is not None:
            last = hb
            if int(hb["seq"]) > g.seq or str(hb["boot_id"]) != g.boot_id:
                return hb
        time.sleep(0.3)
    return last


def guest_console(client: Client, root: Path, g: "Guest", lines: int = 80) -> list[str]:
    """The guest's serial console: its raw QEMU's log, or the agent's copy on the host the VM runs on."""
    if g.raw is not None:
        return g.raw.console(lines)
    try:
        host = client.vm(g.name)["host"]
        with lab.agent_http(root, host, timeout=10) as c:
            return list(c.get(f"/v1/vms/{g.uuid}/serial", params={"lines": lines}).json())
    except Exception:      # noqa: BLE001 - the console is evidence, not a requirement
        return []


async def survived(client: Client, root: Path, client_netns: str, g: "Guest"
                   ) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """(None or the kind of break, the last heartbeat, the console) after a move; a guest that survived has its
    heartbeat recorded."""
    beat = await asyncio.to_thread(next_beat, client_netns, g)
    console = await asyncio.to_thread(guest_console, client, root, g)
    later = console
    if beat is None:
        await asyncio.sleep(5)
        later = await asyncio.to_thread(guest_console, client, root, g)
    kind = classify(g, beat, console, later)
    if kind is None and beat is not None:
        g.seq = int(beat["seq"])
    return kind, beat, later


class Runner:
    """One arm in one lab."""

    def __init__(self, info: lab.LabInfo, arm: str, guests: int, moves: int, dirty: float, out: Path,
                 log: Callable[[str], None], verify_ram: bool = False) -> None:
        self.verify_ram = verify_ram
        self.info, self.arm, self.n_guests, self.target, self.dirty = info, arm, guests, moves, dirty
        self.recipe = recipe_for(arm)
        self.client = Client(info.controller_url, token=info.admin_token(), timeout=60)
        self.result = ArmResult(arm)
        self.out, self.log = out, log
        self.accel = self.client.host("h1")["facts"].get("accelerator", "tcg")
        self.counter = 0          # guests created (their names)
        self.qemu_starts = 0      # raw QEMU processes started (their run folders)
        self.root = Path(info.root)

    # -- guests ---------------------------------------------------------------------------------------
    def _create(self) -> Guest:
        self.counter += 1
        name = f"sv{self.counter}"
        opts: dict[str, Any] = {"encrypted_vmotion": "disabled"} if self.arm == "C-plain" else {}
        vm = self.client.create_vm(name=name, host="h1", memory_mb=256, dirty_mb_s=self.dirty, **opts)
        self.result.guests_used += 1
        return Guest(name, vm["spec"]["guest_ip"], vm["uuid"])

    async def _boot(self, g: Guest) -> None:
        if self.recipe is None:
            await asyncio.to_thread(self.client.start_vm, g.name)
        else:
            spec = VMSpec(**self.client.vm(g.name)["spec"])
            ctx = rawqemu.lab_context(self.root, "h1", self.accel)
            g.raw = await rawqemu.start(spec, ctx, self.info.host_netns("h1"), self._run_dir(g), False, self.recipe)
        hb = await asyncio.to_thread(scenario.wait_guest, self.info.net.client_netns, g.ip, BOOT_WAIT_S)
        g.boot_id, g.seq = str(hb["boot_id"]), int(hb["seq"])
        g.probe = ClientProbe(self.info.net.client_netns, g.ip.split("/")[0], scenario.heartbeat_url(g.ip),
                              interval_ms=10, out=self.out / f"{self.arm}-{g.name}-probe.jsonl")
        g.probe.start()

    def _run_dir(self, g: Guest) -> Path:
        self.qemu_starts += 1
        return self.root / "raw" / f"{g.name}-{self.qemu_starts}"

    async def _remove(self, g: Guest) -> None:
        if g.probe is not None:
            await asyncio.to_thread(g.probe.stop)
        if g.raw is not None:
            await rawqemu.stop(g.raw)
        elif self.client.vm(g.name)["power_state"] == "poweredOn":
            await asyncio.to_thread(self.client.stop_vm, g.name)
        await asyncio.to_thread(self.client.delete_vm, g.name)

    # -- moves ----------------------------------------------------------------------------------------
    async def _move_raw(self, g: Guest, dest: str) -> dict[str, Any]:
        assert g.raw is not None and self.recipe is not None
        ctx = rawqemu.lab_context(self.root, dest, self.accel)
        h = self.info.net.host(dest)
        g.raw, figures = await rawqemu.migrate(g.raw, ctx, h.netns, h.mig_ip, self._run_dir(g), self.recipe,
                                              verify_ram=self.verify_ram)
        return figures

    async def _move_kvmotion(self, g: Guest, dest: str) -> dict[str, Any]:
        task = await asyncio.to_thread(self.client.migrate, g.name, dest)
        t = await asyncio.to_thread(scenario.follow_task, self.client, task["id"], 300)
        if t["state"] != "success":
            raise RuntimeError((t.get("error") or {}).get("message") or t["state"])
        r = t.get("result") or {}
        return {"total_s": r.get("total_time_s"), "downtime_ms": r.get("downtime_ms"),
                "encryption": (r.get("encryption") or {}).get("used")}

    async def _move(self, g: Guest, dest: str) -> dict[str, Any]:
        try:
            fig = await (self._move_raw(g, dest) if self.recipe is not None else self._move_kvmotion(g, dest))
            g.host, g.moved_at = dest, time.time()
            return {"ok": True, "ended_at": g.moved_at, **fig}
        except Exception as exc:      # noqa: BLE001 - a failed move is a result
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    async def _check(self, g: Guest, move: dict[str, Any]) -> dict[str, Any] | None:
        """None when the guest survived; else the failure record (the guest must be replaced)."""
        before = {"boot_id": g.boot_id, "seq": g.seq}
        kind, beat, console = await survived(self.client, self.root, self.info.net.client_netns, g)
        if kind is None:
            return None
        return {"arm": self.arm, "guest": g.name, "kind": kind, "move": move, "host": g.host, "last_beat": beat,
                "before": before, "console": console[-80:],
                "qemu": await self._qemu_state(g) if kind in ("hung", "network-dead") else None}

    async def _qemu_state(self, g: Guest) -> dict[str, Any] | None:
        """What QEMU says of a guest that does not answer: run state, where its vCPU is, and whether it spins."""
        if g.raw is None:
            return None
        try:
            status = (await g.raw.execute("query-status"))["status"]
            tid = (await g.raw.execute("query-cpus-fast"))[0]["thread-id"]
            regs = []
            cpu0 = _thread_cpu_s(g.raw.proc.pid, tid)
            for _ in range(3):
                out = await g.raw.execute("human-monitor-command", {"command-line": "info registers"})
                regs.append(" ".join(t for t in out.split() if t.startswith(("RIP=", "RFL=", "HLT="))))
                await asyncio.sleep(1)
            cpu1 = _thread_cpu_s(g.raw.proc.pid, tid)
            return {"status": status, "rip_samples": regs,
                    "vcpu_busy_pct": None if cpu0 is None or cpu1 is None else round(100 * (cpu1 - cpu0) / 3, 1)}
        except Exception as exc:      # noqa: BLE001 - evidence, best effort
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def run(self) -> ArmResult:
        t0 = time.monotonic()
        guests = [self._create() for _ in range(self.n_guests)]
        await asyncio.gather(*(self._boot(g) for g in guests))
        moves_file = self.out / f"{self.arm}-moves.jsonl"
        rnd = 0
        try:
            while self.result.moves < self.target:
                rnd += 1
                dests = ["h2" if g.host == "h1" else "h1" for g in guests]
                moves = await asyncio.gather(*(self._move(g, d) for g, d in zip(guests, dests)))
                await asyncio.sleep(2)
                for i, (g, mv) in enumerate(zip(guests, moves)):
                    self.result.moves += 1
                    if mv["ok"] and mv.get("downtime_ms") is not None:
                        self.result.downtime_ms.append(float(mv["downtime_ms"]))
                    if not mv["ok"]:
                        self.result.move_failures.append({"guest": g.name, **mv})
                    bad = await self._check(g, mv)
                    with moves_file.open("a") as f:
                        f.write(json.dumps({"round": rnd, "guest": g.name, "move": mv, "broken": bad}) + "\n")
                    if bad is not None:
                        self.result.broken.append(bad)
                        self.log(f"  {self.arm} round {rnd}: {g.name} {bad['kind']}")
                        await self._remove(g)
                        guests[i] = self._create()
                        await self._boot(guests[i])
                self.log(f"{self.arm}: round {rnd}, {self.result.moves} moves, {len(self.result.broken)} broken, "
                         f"{len(self.result.move_failures)} failed moves")
        finally:
            for g in guests:
                await self._remove(g)
            self.result.seconds = time.monotonic() - t0
        return self.result


def run(arms: list[str], moves: int = 200, guests: int = 4, dirty: float = 20.0, out: Path = Path("bench-results"),
        log: Callable[[str], None] = print, verify_ram: bool = False, root_base: Path = ROOT,
        prefix: str | None = None) -> list[dict[str, Any]]:
    prefix = prefix or "sv" + secrets.token_hex(3)      # runs side by side get their own lab
    for arm in arms:
        recipe_for(arm)      # refuse an unknown arm before anything starts
    out.mkdir(parents=True, exist_ok=True)
    image = build_image(log=lambda m: None)
    summaries = []
    for arm in arms:
        root = root_base / f"{prefix}-{arm.lower().replace('+', 'p')}"
        info = lab.up(2, root, prefix=prefix, image_dir=image.kernel.parent.parent, log=lambda m: None)
        try:
            res = asyncio.run(Runner(info, arm, guests, moves, dirty, out, log, verify_ram).run())
        finally:
            lab.down(root)
        summary = res.summary()
        summaries.append(summary)
        with (out / "guest-survival.json").open("a") as f:
            f.write(json.dumps({"summary": summary, "broken": res.broken, "move_failures": res.move_failures,
                                "at": time.time()}) + "\n")
        log(json.dumps(summary))
    return summaries


ARM_TEXT = {"A": "plain `migrate`, QEMU's defaults", "B": "kvmotion's QMP sequence, no kvmotion",
            "C": "kvmotion (controller + agents), default encryption", "C-plain": "kvmotion, encryption disabled",
            "A-ram-pad": "A, guest RAM + 8 KiB", "D-ram-pad": "B, guest RAM + 8 KiB"}


def _arm_text(arm: str) -> str:
    if arm in ARM_TEXT:
        return ARM_TEXT[arm]
    if arm.startswith("D-no-"):
        return f"B without {arm[5:]}"
    if arm.startswith("A+"):
        return f"A with {arm[2:]}"
    return arm


def _trace(console: list[str]) -> list[str]:
    """The lines of a console that say what broke (first crash line and the few after it)."""
    for i, line in enumerate(console):
        if any(m in line for m in scenario.CRASH_MARKERS):
            return console[i:i + 8]
    return console[-4:]


def lost_pages(out: Path, arm: str) -> tuple[int, int] | None:
    """(moves whose destination RAM differed from the source's, moves compared), from ``--verify-ram`` runs."""
    path = out / f"{arm}-moves.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    compared = [r["move"] for r in rows if r["move"].get("pages_differ") is not None]
    if not compared:
        return None
    return sum(1 for m in compared if m["pages_differ"] > 0), len(compared)


def markdown(runs: list[dict[str, Any]], out: Path) -> str:
    """The A/B/C/D table and one trace per broken guest, from the lines of ``guest-survival.json``."""
    lines = ["| arm | what | moves | broken | rate | 95 % CI | kinds | failed moves | moves with lost pages |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run_ in runs:
        s = run_["summary"]
        lp = lost_pages(out, s["arm"])
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items())) or "–"
        lines.append(f"| {s['arm']} | {_arm_text(s['arm'])} | {s['moves']} | {s['broken']} | {100 * s['rate']:.1f} % | "
                     f"{100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f} % | {kinds} | {s['move_failures']} | "
                     f"{f'{lp[0]} of {lp[1]}' if lp else '–'} |")
    lines.append("")
    for run_ in runs:
        for b in run_["broken"]:
            lines += [f"- **{b['arm']}**, {b['guest']} on {b['host']}: {b['kind']} "
                      f"(downtime {b['move'].get('downtime_ms')} ms)", "", "  ```"]
            lines += [f"  {ln[:160]}" for ln in _trace(b.get("console") or [])] + ["  ```", ""]
    return "\n".join(lines) + "\n"
