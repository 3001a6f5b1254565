"""The lab's commands: `kvmotion-lab lab|image|bench|demo`, and the same under `kvmotion` when this package is
installed (the product CLI finds :func:`register` through the ``kvmotion.cli`` entry-point group).

The lab's modules are imported by each command, not here: the product CLI loads this module at every start, and
the lab pulls in agent and controller modules that a `kvmotion vm list` has no use for."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kvmotion.cli.output import console, err_console, print_json
from kvmotion.common.errors import KvmotionError

lab_app = typer.Typer(help="the multi-host lab on this machine", no_args_is_help=True)
image_app = typer.Typer(help="the guest image", no_args_is_help=True)
bench_app = typer.Typer(help="benchmarks in the lab (figures and ratios, no pass/fail)", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the lab's command groups and `demo` to a Typer app (the product CLI's, or kvmotion-lab's own)."""
    app.add_typer(lab_app, name="lab")
    app.add_typer(image_app, name="image")
    app.add_typer(bench_app, name="bench")
    app.command("demo")(demo)


def main() -> None:
    app = typer.Typer(help="kvmotion-lab: the multi-host lab, guest image, benchmarks and demo",
                      no_args_is_help=True, add_completion=False)
    register(app)
    app()


@lab_app.command("up")
def lab_up(hosts: int = typer.Option(2, "--hosts", help="hosts per controller"),
           controllers: int = typer.Option(1, "--controllers", min=1, max=2,
                                           help="2: a second controller, in one trust domain with the first "
                                                "(docs/domains.md); it manages hosts h(N+1)..h(2N)"),
           link: Optional[str] = typer.Option(None, "--link",
                                              help="shape each host's migration link with tc: 1g or 10g"),
           root: Optional[Path] = None) -> None:
    from kvmotion_lab import lab
    from kvmotion_lab.netns import LabError
    from kvmotion_lab.image.build import build_image

    try:
        image = build_image(log=lambda m: console.print(f"[dim]{m}[/]"))
        info = lab.up(hosts, root or lab.DEFAULT_ROOT, image_dir=image.kernel.parent.parent,
                      log=lambda m: console.print(m), link=link, controllers=controllers)
    except (LabError, KvmotionError) as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1)
    console.print(f"[green]lab up[/]: controller {info.controller_url}; admin token in "
                  f"{lab.admin_token_path(info.root)}")
    if root is not None and root != lab.DEFAULT_ROOT:
        console.print(f"export KVMOTION_CONFIG={lab.cli_config_path(info.root)}")
    for name, site in info.controllers.items():
        if site.root != info.root:
            console.print(f"controller {site.member}: {site.url}, hosts {', '.join(info.hosts_of(name))}; its CLI: "
                          f"KVMOTION_CONFIG={lab.site_cli_config(info.root, site)} kvmotion …")


@lab_app.command("down")
def lab_down(root: Optional[Path] = None) -> None:
    from kvmotion_lab import lab

    removed = lab.down(root or lab.DEFAULT_ROOT)
    console.print("removed: " + (", ".join(removed) if removed else "nothing (no lab was up)"))


@lab_app.command("status")
def lab_status(root: Optional[Path] = None) -> None:
    from kvmotion_lab import lab

    print_json(lab.status(root or lab.DEFAULT_ROOT))


@image_app.command("build")
def image_build(force: bool = typer.Option(False, "--force"),
                debian: bool = typer.Option(False, "--debian", help="the Debian 12 disk image (BIOS and UEFI) "
                                            "instead of the tiny kernel guest")) -> None:
    from kvmotion_lab.image.build import build_image

    if debian:
        _image_build_debian(force)
        return
    try:
        img = build_image(force=force, log=lambda m: console.print(f"[dim]{m}[/]"))
    except Exception as exc:  # noqa: BLE001 - ImageBuildError names the fix
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1)
    console.print(f"guest image: kernel {img.kernel} ({img.version}), initrd {img.initrd}")


def _image_build_debian(force: bool) -> None:
    from kvmotion_lab.image.debian import build_debian_image

    try:
        img = build_debian_image(force=force, log=lambda m: console.print(f"[dim]{m}[/]"))
    except Exception as exc:  # noqa: BLE001 - ImageBuildError names the fix
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1)
    console.print(f"Debian 12 disk image: {img.disk} (kernel {img.kernel}, recipe {img.recipe_hash[:16]}, "
                  f"built in {img.build_seconds:.0f} s)")


@bench_app.command("evacuate")
def bench_evacuate(vms: int = 4, memory: int = 512, link: str = "1g",
                   out: Optional[Path] = typer.Option(None, help="write the results as JSON")) -> None:
    """Evacuate N VMs over a shaped link, with admission control and with everything at once."""
    from kvmotion_lab.bench import evacuate

    results = evacuate.run(vms, memory, link, out, log=lambda m: console.print(f"[dim]{m}[/]"))
    table = Table("admission", "state", "makespan s", "lower bound s", "ratio", "max concurrent", "downtime ms per VM",
                  title=f"evacuate {vms} × {memory} MiB over {link}")
    for r in results:
        table.add_row("on" if r["admission"] else "off (all at once)", r["state"], str(r["makespan_s"]),
                      str(r["lower_bound_s"]), str(r["ratio"]), str(r["max_concurrent"]),
                      ", ".join(f"{k}={v}" for k, v in sorted(r["downtime_ms"].items())))
    console.print(table)


@bench_app.command("migrate")
def bench_migrate(sizes: str = typer.Option("256,1024,2048", help="guest RAM, MiB"),
                  dirty: str = typer.Option("0,20,100", help="guest dirty rates, MB/s"),
                  links: str = typer.Option("unshaped,1g,10g", help="migration links: unshaped, 1g, 10g"),
                  variants: str = typer.Option("kvmotion,qemu-defaults",
                                               help="qemu-defaults is a plain QEMU migration (no kvmotion); "
                                               "also: one-stream, multifd-N, xbzrle, no-xbzrle, equal-cpu"),
                  repeat: int = typer.Option(3, min=3, max=50, help="runs per case; the order alternates"),
                  out: Path = typer.Option(Path("bench-results"), help="JSON, Markdown and PNG plots go here"),
                  root: Path = typer.Option(Path("/tmp/kvmotion-bench-migrate"), help="the bench lab's directory"),
                  prefix: str = typer.Option("kvbm", help="the bench lab's namespace prefix (unique per lab)")
                  ) -> None:
    """Sweep RAM × dirty rate × link; kvmotion against a plain QEMU migration with its defaults."""
    from kvmotion_lab.bench import migrate, report

    try:
        sweep = migrate.Sweep(sizes=[int(x) for x in sizes.split(",")], dirty=[float(x) for x in dirty.split(",")],
                            links=links.split(","), variants=[v.strip() for v in variants.split(",") if v.strip()],
                            repeat=repeat)
        sweep.check()
    except ValueError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    result = migrate.run(sweep, out, log=lambda m: console.print(m, markup=False, highlight=False), root=root,
                       prefix=prefix)
    console.print(report.markdown(result), markup=False, highlight=False)
    console.print(f"results: {out / 'bench-migrate.json'}, {out / 'bench-migrate.md'}, "
                  f"{out / 'remaining.png'}, {out / 'downtime.png'}")


@bench_app.command("service")
def bench_service(memory: int = typer.Option(1024, help="guest MiB"),
                  runs: int = typer.Option(3, min=3, max=50, help="moves per side; the order rotates"),
                  clients: int = typer.Option(4, min=1, max=32, help="transaction clients in the client namespace"),
                  firmware: str = typer.Option("bios", help="bios or uefi"),
                  link: str = typer.Option("unshaped", help="unshaped, 1g or 10g"),
                  variants: str = typer.Option("kvmotion,kvmotion-plain,qemu-defaults",
                                               help="kvmotion (default encryption), kvmotion-plain (encryption "
                                               "disabled), qemu-defaults (a plain QEMU migration)"),
                  out: Path = typer.Option(Path("bench-results/service"), help="JSON, Markdown and run logs"),
                  ) -> None:
    """A database under load in the Debian guest, moved live: throughput, client gap, data intact."""
    from kvmotion_lab.bench import service, service_report

    try:
        sweep = service.ServiceSweep(memory_mb=memory, runs=runs, clients=clients, firmware=firmware, link=link,
                                     variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
        sweep.check()
    except ValueError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    result = service.run(sweep, out, log=lambda m: console.print(m, markup=False, highlight=False))
    console.print(service_report.markdown(result), markup=False, highlight=False)
    console.print(f"results: {out / 'bench-service.json'}, {out / 'bench-service.md'}")


@bench_app.command("soak")
def bench_soak(migrations: int = typer.Option(50, min=1, max=10000), dirty: float = typer.Option(20.0, help="MB/s"),
               memory: int = typer.Option(256, help="guest MiB (the Debian guest: at least 512)"),
               guest: str = typer.Option("tiny", help="tiny, or debian: the Debian 12 disk guest under UEFI, "
                                         "committing a database transaction after every move")) -> None:
    """Back-and-forth live migrations of one dirtying guest; exit 1 on any failure or heartbeat break."""
    from kvmotion_lab.bench import soak

    if guest not in soak.GUEST_BOOT_S:
        err_console.print(f"[red]error:[/] --guest {guest!r}: use tiny or debian")
        raise typer.Exit(2)
    tally = soak.run(migrations, dirty, memory, log=lambda m: console.print(m, markup=False, highlight=False),
                     guest=guest)
    t = tally.as_dict()
    console.print(f"soak: {t['migrations']} migrations, {t['failures']} failures, "
                  f"{len(t['heartbeat_breaks'])} heartbeat breaks, {len(t['guests'])} guest(s) used; "
                  f"downtime p50 {t['downtime_ms_p50']} ms, p99 {t['downtime_ms_p99']} ms, max {t['downtime_ms_max']} "
                  f"ms ({t['downtime_unknown']} not reported); total p50 {t['total_s_p50']} s")
    for g in t["guests"]:
        console.print(f"  guest {g['guest']}: boot {g['boot_id']}, survived {g['moves_survived']} moves, {g['ended']}")
    if t["ledger"]:
        console.print(f"  database: {t['ledger']['committed']} transactions committed across the moves, "
                      f"{'all in the ledger, balances add up' if t['ledger']['intact'] else 'NOT INTACT'}")
    for reason in t["failure_reasons"] + t["heartbeat_breaks"]:
        err_console.print(f"[red]{reason}[/]")
    raise typer.Exit(0 if tally.ok else 1)


@bench_app.command("guest-survival")
def bench_survival(arms: str = typer.Option("A,B,C", help="A, B, C, C-plain, A+FIELD, D-no-FIELD, D-qemu-bandwidth, "
                                            "D-qemu-downtime, D-xbzrle, D-sampled, D-tcg-multi (comma-separated)"),
                   moves: int = typer.Option(200, min=1, max=100000, help="moves per arm"),
                   guests: int = typer.Option(4, min=1, max=16, help="guests moved at once"),
                   dirty: float = typer.Option(20.0, help="MB/s each guest dirties"),
                   verify_ram: bool = typer.Option(False, help="raw arms: compare source and destination RAM at "
                                                   "every switchover (pages the migration lost)"),
                   out: Path = typer.Option(Path("bench-results"), help="guest-survival.json, .md and per-move logs")
                   ) -> None:
    """How often a guest breaks when live-migrated: QEMU's defaults vs kvmotion's sequence vs kvmotion."""
    from kvmotion_lab.bench import survival

    try:
        names = [a.strip() for a in arms.split(",") if a.strip()]
        for a in names:
            survival.recipe_for(a)
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(2)
    for s in survival.run(names, moves, guests, dirty, out, verify_ram=verify_ram,
                          log=lambda m: console.print(m, markup=False, highlight=False)):
        lo, hi = s["ci95"]
        console.print(f"{s['arm']:>22}: {s['broken']}/{s['moves']} broken ({100 * s['rate']:.1f} %, 95 % CI "
                      f"{100 * lo:.1f}–{100 * hi:.1f} %) {s['kinds']}; failed moves {s['move_failures']}; "
                      f"{s['guests_used']} guests; {s['seconds']:.0f} s")
    runs = [json.loads(line) for line in (out / "guest-survival.json").read_text().splitlines() if line.strip()]
    (out / "guest-survival.md").write_text(survival.markdown(runs, out))
    console.print(f"table and traces: {out / 'guest-survival.md'}")


@bench_app.command("report")
def bench_report(results: Path = typer.Argument(..., help="a bench-migrate.json"),
                 out: Optional[Path] = typer.Option(None, help="where the Markdown and plots go (default: beside)")) -> None:
    """Render a `bench migrate` result again: the Markdown table, the targets and the plots."""
    from kvmotion_lab.bench import report

    try:
        result = json.loads(results.read_text())
    except (OSError, ValueError) as exc:
        err_console.print(f"[red]error:[/] cannot read {results}: {exc}; remedy: pass a bench-migrate.json")
        raise typer.Exit(2)
    out = out or results.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-migrate.md").write_text(report.markdown(result))
    report.plots(result, out)
    console.print(report.markdown(result), markup=False, highlight=False)


def demo(memory: int = typer.Option(256, help="guest MiB"), dirty: float = typer.Option(0.0, help="MB/s"),
         keep: bool = typer.Option(False, help="leave the lab up"),
         guest: str = typer.Option("auto", help="auto: the Debian 12 disk guest when built, else the tiny one; "
                                   "debian; tiny")) -> None:
    """Lab up, a VM on h1 with a pinging client, live vMotion to h2, the figures, lab down."""
    from kvmotion_lab.demo import run_demo

    if guest not in ("auto", "debian", "tiny"):
        err_console.print(f"[red]error:[/] --guest {guest!r}: use auto, debian or tiny")
        raise typer.Exit(2)
    sys.exit(run_demo(console, memory_mb=memory, dirty=dirty, keep=keep, guest=guest))


if __name__ == "__main__":
    main()
