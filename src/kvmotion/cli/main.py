"""kvmotion: the command line (talks to the controller API)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.progress import follow, follow_evacuation, print_evacuation, print_outcome
from kvmotion.common.errors import KvmotionError

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(help="kvmotion: vMotion for QEMU/KVM", no_args_is_help=True, add_completion=False)
host_app = typer.Typer(help="hosts (hypervisors with a kvmotion agent)", no_args_is_help=True)
vm_app = typer.Typer(help="virtual machines", no_args_is_help=True)
task_app = typer.Typer(help="tasks (migrations)", no_args_is_help=True)
lab_app = typer.Typer(help="the multi-host lab on this machine", no_args_is_help=True)
image_app = typer.Typer(help="the guest image", no_args_is_help=True)
cluster_app = typer.Typer(help="clusters and EVC baselines", no_args_is_help=True)
cdrom_app = typer.Typer(help="CD/DVD media of a VM", no_args_is_help=True)
maint_app = typer.Typer(help="maintenance mode", no_args_is_help=True)
bench_app = typer.Typer(help="benchmarks in the lab (figures and ratios, no pass/fail)", no_args_is_help=True)
host_app.add_typer(maint_app, name="maintenance")
cert_app = typer.Typer(help="host certificates for encrypted vMotion", no_args_is_help=True)
host_app.add_typer(cert_app, name="cert")
vm_app.add_typer(cdrom_app, name="cdrom")
token_app = typer.Typer(help="API tokens (admin)", no_args_is_help=True)
for sub, name in ((host_app, "host"), (vm_app, "vm"), (task_app, "task"), (lab_app, "lab"), (image_app, "image"),
                  (cluster_app, "cluster"), (bench_app, "bench"), (token_app, "token")):
    app.add_typer(sub, name=name)

URL = typer.Option(None, "--url", envvar="KVMOTION_URL", help="controller URL")
T = TypeVar("T")


def run(fn: Callable[[], T]) -> T:
    """Run a command; a kvmotion error becomes a clear message and a non-zero exit code."""
    try:
        return fn()
    except KvmotionError as exc:
        err_console.print(f"[red]error:[/] {exc.message}")
        if exc.remedy:
            err_console.print(f"[yellow]fix:[/] {exc.remedy}")
        for f in exc.details.get("findings", []):
            err_console.print(f"  [{f['severity']}] {f['code']} ({f['subject']}): {f['message']} — fix: {f['remedy']}")
        raise typer.Exit(3 if exc.code == "PRECHECK_FAILED" else
                         2 if exc.code in ("NOT_FOUND", "INVALID_INPUT", "CONFLICT") else
                         4 if exc.code in ("UNAUTHORIZED", "FORBIDDEN") else 1)


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


# -- hosts -------------------------------------------------------------------------------
@host_app.command("add")
def host_add(address: str,
             secret_file: Path = typer.Option(..., "--secret-file", help="the agent's agent.secret (from its host)"),
             name: Optional[str] = typer.Option(None), url: Optional[str] = URL) -> None:
    """Enrol a host by its agent's address, e.g. http://198.18.0.11:8770, and the agent's secret."""
    try:
        secret = secret_file.read_text().strip()
    except OSError as exc:
        err_console.print(f"[red]error:[/] cannot read {secret_file}: {exc.strerror}")
        err_console.print("[yellow]fix:[/] copy agent.secret from the host's state directory (mode 0600)")
        raise typer.Exit(2)
    h = run(lambda: Client(url).add_host(address, secret, name))
    console.print(f"enrolled host [bold]{h['name']}[/] ({h['state']})")


@host_app.command("enrol-token")
def host_enrol_token(name: str = typer.Option("enrol", help="token name"),
                     ttl_hours: float = typer.Option(24.0, help="lifetime"), url: Optional[str] = URL) -> None:
    """A token agents use to register themselves (their config's enrol_token_file); it expires."""
    t = run(lambda: Client(url).create_token(name, "enrol", int(ttl_hours * 3600)))
    console.print(t["token"])


@token_app.command("create")
def token_create(name: str, role: str = typer.Option(..., help="viewer | operator | admin"),
                 ttl_hours: Optional[float] = typer.Option(None, help="lifetime (default: no expiry)"),
                 url: Optional[str] = URL) -> None:
    """Make an API token; it is printed once (only its hash is kept)."""
    t = run(lambda: Client(url).create_token(name, role, int(ttl_hours * 3600) if ttl_hours else None))
    err_console.print(f"token [bold]{t['name']}[/] ({t['role']}); store it now, it is not shown again:")
    console.print(t["token"])


@token_app.command("list")
def token_list(url: Optional[str] = URL) -> None:
    import datetime as dt

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"
    table = Table("name", "role", "created", "expires", "last used", "state")
    for t in run(lambda: Client(url).tokens()):
        table.add_row(t["name"], t["role"], when(t["created_at"]), when(t["expires_at"]), when(t["last_used"]),
                      "revoked" if t["revoked"] else "valid")
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).revoke_token(name))
    console.print(f"revoked token [bold]{name}[/]")


@app.command("audit")
def audit(limit: int = typer.Option(50, help="newest first"), url: Optional[str] = URL) -> None:
    """Who did what and when: every state-changing API call."""
    import datetime as dt

    table = Table("when", "who", "role", "call", "status", "from")
    for a in run(lambda: Client(url).audit(limit)):
        table.add_row(dt.datetime.fromtimestamp(a["at"]).strftime("%Y-%m-%d %H:%M:%S"), a["who"], a["role"],
                      f"{a['method']} {a['path']}", str(a["status"]), a["client"])
    console.print(table)


@host_app.command("list")
def host_list(url: Optional[str] = URL) -> None:
    table = Table("name", "state", "address", "accel", "mem free/total MiB", "datastores", "migration if")
    for h in run(lambda: Client(url).hosts()):
        f = h.get("facts") or {}
        ds = ", ".join(d["name"] for d in f.get("datastores", []) if d.get("readable"))
        mig = ", ".join(f"{i['address']} {i.get('speed_mbps') or '?'}Mb" for i in f.get("migration_interfaces", []))
        table.add_row(h["name"], h["state"], h["address"], f.get("accelerator", "-"),
                      f"{f.get('mem_free_mb', '-')}/{f.get('mem_total_mb', '-')}", ds, mig)
    console.print(table)


@host_app.command("show")
def host_show(name: str, url: Optional[str] = URL) -> None:
    h = run(lambda: Client(url).host(name))
    facts = h.pop("facts", {})
    facts["cpu_features"] = f"{len(facts.get('cpu_features', []))} features"
    _print_json(h | {"facts": facts})


# -- VMs ---------------------------------------------------------------------------------
@vm_app.command("create")
def vm_create(name: str, host: str = typer.Option(..., "--host"), memory: int = typer.Option(256, help="MiB"),
              vcpus: int = 1, datastore: Optional[str] = None, network: str = "VM Network",
              disk_mb: int = 64, ip: Optional[str] = typer.Option(None, help="e.g. 198.18.1.120/24"),
              dirty: float = typer.Option(0.0, help="guest memory dirtier rate, MB/s"),
              dirty_region_mb: Optional[int] = typer.Option(None, help="how much RAM the dirtier rewrites (MiB)"),
              cpu: Optional[str] = typer.Option(None, help="CPU model, or host-passthrough"),
              cpu_mask: Optional[str] = typer.Option(None, help="CPU features to hide, comma separated"),
              encrypted_vmotion: str = typer.Option("opportunistic", help="disabled | opportunistic | required"),
              marker: Optional[str] = typer.Option(None, help="a string the guest keeps in RAM (wire tests)"),
              encrypted_disk: bool = typer.Option(False, "--encrypted-disk", help="LUKS disk; keys from the controller"),
              data_disk_mb: Optional[int] = typer.Option(None, help="add a data disk (vdb) of this size"),
              data_datastore: Optional[str] = typer.Option(None, help="datastore of the data disk"),
              disk_format: str = typer.Option("qcow2", help="qcow2 | raw"),
              records_rate: Optional[int] = typer.Option(None, help="guest writes checksummed records to the data "
                                                                    "disk at this rate (records/s, 0 = flat out)"),
              url: Optional[str] = URL) -> None:
    mask = [f for f in (cpu_mask or "").split(",") if f]
    vm = run(lambda: Client(url).create_vm(name=name, host=host, memory_mb=memory, vcpus=vcpus, datastore=datastore,
                                           network=network, disk_mb=disk_mb, ip=ip, dirty_mb_s=dirty,
                                           dirty_region_mb=dirty_region_mb, cpu_model=cpu,
                                           cpu_mask=mask, encrypted_vmotion=encrypted_vmotion, marker=marker,
                                           encrypted_disk=encrypted_disk, data_disk_mb=data_disk_mb,
                                           data_datastore=data_datastore, disk_format=disk_format,
                                           records_rate=records_rate))
    console.print(f"created VM [bold]{vm['name']}[/] ({vm['uuid']}) on {vm['host']}, "
                  f"datastore {vm['spec']['boot_datastore']}, ip {vm['spec']['guest_ip']}")


POLICY_HELP = "migration policy (unset: inherited from the cluster, then the defaults)"


def _policy(downtime_ms: Optional[int], progress_timeout_s: Optional[float], completion_timeout_s_per_gib: Optional[float],
            auto_converge: Optional[bool], xbzrle: Optional[bool],
            allow_postcopy: Optional[bool] = None) -> dict[str, Any] | None:
    p = {"downtime_ms": downtime_ms, "progress_timeout_s": progress_timeout_s, "auto_converge": auto_converge,
         "completion_timeout_s_per_gib": completion_timeout_s_per_gib, "xbzrle": xbzrle,
         "allow_postcopy": allow_postcopy}
    p = {k: v for k, v in p.items() if v is not None}
    return p or None


@vm_app.command("set")
def vm_set(vm: str, encrypted_vmotion: Optional[str] = typer.Option(None, help="disabled | opportunistic | required"),
           downtime_ms: Optional[int] = typer.Option(None, help=f"switchover ceiling, {POLICY_HELP}"),
           progress_timeout_s: Optional[float] = typer.Option(None, help=POLICY_HELP),
           completion_timeout_s_per_gib: Optional[float] = typer.Option(None, help=POLICY_HELP),
           auto_converge: Optional[bool] = typer.Option(None, "--auto-converge/--no-auto-converge", help=POLICY_HELP),
           xbzrle: Optional[bool] = typer.Option(None, "--xbzrle/--no-xbzrle", help=POLICY_HELP),
           allow_postcopy: Optional[bool] = typer.Option(None, "--allow-postcopy/--no-allow-postcopy",
                                                         help=f"post-copy as the last escalation step, {POLICY_HELP}"),
           url: Optional[str] = URL) -> None:
    """Change a VM's settings: encrypted vMotion, and its migration policy."""
    policy = _policy(downtime_ms, progress_timeout_s, completion_timeout_s_per_gib, auto_converge, xbzrle,
                     allow_postcopy)
    out = run(lambda: Client(url).update_vm(vm, encrypted_vmotion=encrypted_vmotion, migration_policy=policy))
    console.print(f"VM [bold]{out['name']}[/]: encrypted vMotion {out['spec']['encrypted_vmotion']}, "
                  f"migration policy {out['migration_policy'] or 'inherited'}")


@cert_app.command("renew")
def cert_renew(host: str, url: Optional[str] = URL) -> None:
    """Issue HOST new migration certificates from the controller's CA (its keys stay on the host)."""
    out = run(lambda: Client(url).cert_renew(host))
    console.print(f"host {host}: certificates {'valid' if out['supported'] else 'NOT valid'} until {out['not_after']}")


@cert_app.command("remove")
def cert_remove(host: str, url: Optional[str] = URL) -> None:
    """Remove HOST's migration certificates: it can no longer migrate encrypted."""
    run(lambda: Client(url).cert_remove(host))
    console.print(f"host {host}: certificates removed (encrypted vMotion unsupported)")


@vm_app.command("start")
def vm_start(vm: str, url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).start_vm(vm))
    console.print(f"VM [bold]{out['name']}[/] powered on on {out['host']} (pid {out['runtime']['pid']})")


@vm_app.command("stop")
def vm_stop(vm: str, url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).stop_vm(vm))
    console.print(f"VM [bold]{out['name']}[/] powered off")


@vm_app.command("delete")
def vm_delete(vm: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).delete_vm(vm))
    console.print(f"VM [bold]{vm}[/] deleted")


@vm_app.command("list")
def vm_list(url: Optional[str] = URL) -> None:
    table = Table("name", "host", "power", "memory MiB", "datastore", "ip", "uuid")
    for v in run(lambda: Client(url).vms()):
        s = v["spec"]
        table.add_row(v["name"], v["host"], v["power_state"], str(s["memory_mb"]), s["boot_datastore"],
                      s.get("guest_ip") or "-", v["uuid"])
    console.print(table)


@vm_app.command("show")
def vm_show(vm: str, url: Optional[str] = URL) -> None:
    _print_json(run(lambda: Client(url).vm(vm)))


SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def findings_table(findings: list[dict[str, Any]], title: str) -> Table:
    table = Table("severity", "code", "subject", "reason", "remedy", title=title)
    for f in findings:
        style = SEVERITY_STYLE.get(f["severity"], "")
        table.add_row(f"[{style}]{f['severity']}[/]", f["code"], f["subject"], f["message"], f["remedy"])
    return table


def check_migration(client: Client, vm: str, host: str | None, **opts: Any) -> int:
    """Print every finding; 0 when nothing blocks the move, 3 when something does."""
    findings = run(lambda: client.validate(vm, host, **opts))
    errors = [f for f in findings if f["severity"] == "error"]
    where = " ".join(x for x in (host, opts.get("datastore")) if x) or "new placement"
    console.print(findings_table(findings, f"compatibility: {vm} → {where}"))
    console.print(f"[red]{len(errors)} error(s): the migration would be refused[/]" if errors
                  else "[green]no errors: the migration can start[/]")
    return 3 if errors else 0


def parse_disk_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        ref, sep, ds = item.partition("=")
        if not sep or not ref or not ds:
            err_console.print(f"[red]error:[/] --disk {item!r}: write it as INDEX=DATASTORE, e.g. --disk 0=shared")
            raise typer.Exit(2)
        out[ref] = ds
    return out


@vm_app.command("validate")
def vm_validate(vm: str, host: Optional[str] = typer.Option(None, "--host"),
                datastore: Optional[str] = typer.Option(None, "--datastore"), url: Optional[str] = URL) -> None:
    """Every compatibility finding for moving VM to HOST and/or DATASTORE, at once (exit 3 on errors)."""
    raise typer.Exit(check_migration(Client(url), vm, host, datastore=datastore))


@vm_app.command("migrate")
def vm_migrate(vm: str, host: Optional[str] = typer.Option(None, "--host", help="destination host"),
               datastore: Optional[str] = typer.Option(None, "--datastore", help="move the VM's files to this datastore"),
               disk: list[str] = typer.Option([], "--disk", help="per-disk placement, e.g. --disk 0=ds1 --disk 1=ds2"),
               disk_format: Optional[str] = typer.Option(None, "--disk-format", help="qcow2 (thin) | raw (preallocated)"),
               disk_mbps: Optional[int] = typer.Option(None, help="cap for disk copies, Mbit/s"),
               downtime_ms: Optional[int] = typer.Option(None, help="switchover budget (default: policy, 500)"),
               max_bandwidth_mbps: Optional[int] = typer.Option(None, help="cap; default the link speed"),
               priority: str = typer.Option("normal", help="high|normal"),
               auto_converge: Optional[bool] = typer.Option(None, "--auto-converge/--no-auto-converge",
                                                            help="let QEMU throttle the guest when pre-copy stops "
                                                                 "converging (default: policy, on)"),
               progress_timeout_s: Optional[float] = typer.Option(None, help="cancel when remaining memory makes no "
                                                                             "new low for this long (default: policy, 150)"),
               xbzrle: Optional[bool] = typer.Option(None, "--xbzrle/--no-xbzrle",
                                                     help="delta-encode rewritten pages (default: when predicted "
                                                          "not to converge)"),
               allow_postcopy: Optional[bool] = typer.Option(None, "--allow-postcopy/--no-allow-postcopy",
                                                             help="end the escalation in post-copy rather than "
                                                                  "cancel (default: policy, off)"),
               postcopy_mbps: Optional[int] = typer.Option(None, help="cap for the post-copy phase, Mbit/s"),
               wait: bool = typer.Option(True, help="follow the task and print its summary"),
               check: bool = typer.Option(False, "--check", help="only print the compatibility findings"),
               force_complete: bool = typer.Option(False, "--force-complete",
                                                   help="switch the VM's running live migration over now "
                                                        "(post-copy when its policy allows it)"),
               url: Optional[str] = URL) -> None:
    """Move a VM: vMotion (--host), Storage vMotion (--datastore/--disk), both (shared-nothing), or cold."""
    client = Client(url)
    if force_complete:
        running = [t for t in run(lambda: client.tasks(200)) if t["state"] == "running"
                   and vm in (t["vm_name"], t["vm_uuid"])]
        if not running:
            err_console.print(f"[red]error:[/] VM {vm} has no running migration; remedy: start one first")
            raise typer.Exit(3)
        if wait:
            task_force_complete(running[0]["id"], url)
        else:
            t = run(lambda: client.force_complete(running[0]["id"]))
            console.print(f"task {t['id']}: switching over now")
        return
    opts: dict[str, Any] = {"datastore": datastore, "disks": parse_disk_map(disk), "disk_format": disk_format,
                            "disk_mbps": disk_mbps}
    if check:
        raise typer.Exit(check_migration(client, vm, host, **opts))
    task = run(lambda: client.migrate(vm, host, downtime_ms=downtime_ms, max_bandwidth_mbps=max_bandwidth_mbps,
                                      priority=priority, auto_converge=auto_converge,
                                      progress_timeout_s=progress_timeout_s, allow_postcopy=allow_postcopy, xbzrle=xbzrle,
                                      postcopy_bandwidth_mbps=postcopy_mbps, **opts))
    shown = task["options"].get("findings", [])
    if shown:
        console.print(findings_table(shown, "compatibility (not blocking)"))
    if not wait:
        console.print(f"task {task['id']}")
        return
    task = run(lambda: follow(client, task["id"], console))
    print_outcome(task, console)
    if task["state"] != "success":
        raise typer.Exit(1)


@cdrom_app.command("connect")
def cdrom_connect(vm: str, iso: Optional[str] = typer.Option(
                      None, help="an ISO image, relative to a datastore (host-attached media: blocks vMotion)"),
                  datastore: Optional[str] = typer.Option(None, help="the ISO's datastore (default: the VM's)"),
                  nbd: Optional[str] = typer.Option(None, help="client media: nbd://HOST:PORT/EXPORT"),
                  drive: str = "cd0", url: Optional[str] = URL) -> None:
    """Connect a CD/DVD image: an ISO on a datastore, or client media exported over NBD."""
    if (iso is None) == (nbd is None):
        err_console.print("[red]error:[/] give exactly one of --iso or --nbd")
        raise typer.Exit(2)
    media, path = ("local", iso) if iso is not None else ("client", None)
    out = run(lambda: Client(url).cdrom(vm, drive, media, path=path, nbd=nbd, datastore=datastore))
    console.print(f"{out['name']}: {drive} now has {media} media")


@cdrom_app.command("disconnect")
def cdrom_disconnect(vm: str, drive: str = "cd0", url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).cdrom(vm, drive, "none"))
    console.print(f"{out['name']}: {drive} is empty")


@maint_app.command("enter")
def maintenance_enter(host: str, wait: bool = typer.Option(False, "--wait", help="follow the evacuation"),
                      url: Optional[str] = URL) -> None:
    """Evacuate HOST (vMotion running VMs, re-register powered-off ones), then put it in maintenance."""
    client = Client(url)
    task = run(lambda: client.maintenance(host, True))
    console.print(f"host {host}: entering maintenance mode (task {task['id'][:8]}); nothing new is placed on it")
    if not wait:
        return
    task = run(lambda: follow_evacuation(client, task["id"], console))
    print_evacuation(task, console)
    if task["state"] != "success":
        raise typer.Exit(1)


@maint_app.command("exit")
def maintenance_exit(host: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).maintenance(host, False))
    console.print(f"host {host} is back in service")


@cluster_app.command("create")
def cluster_create(name: str, evc: Optional[str] = typer.Option(None, help="EVC baseline CPU model"),
                   url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).create_cluster(name, evc))
    console.print(f"cluster {c['name']} created (EVC {c['evc_mode'] or 'off'})")


@cluster_app.command("add-host")
def cluster_add_host(name: str, host: str, url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).cluster_add_host(name, host))
    console.print(f"cluster {c['name']}: hosts {', '.join(c['hosts'])}")


@cluster_app.command("evc-modes")
def cluster_evc_modes(name: str, url: Optional[str] = URL) -> None:
    """EVC baselines every host of the cluster supports, richest first."""
    for m in run(lambda: Client(url).evc_modes(name)):
        console.print(m)


@cluster_app.command("set-evc")
def cluster_set_evc(name: str, mode: str, url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).set_evc(name, None if mode == "off" else mode))
    console.print(f"cluster {c['name']}: EVC {c['evc_mode'] or 'off'} (applies to VMs at their next power-on)")


@cluster_app.command("set-policy")
def cluster_set_policy(name: str, downtime_ms: Optional[int] = typer.Option(None, help="switchover ceiling"),
                       progress_timeout_s: Optional[float] = None, completion_timeout_s_per_gib: Optional[float] = None,
                       auto_converge: Optional[bool] = typer.Option(None, "--auto-converge/--no-auto-converge"),
                       xbzrle: Optional[bool] = typer.Option(None, "--xbzrle/--no-xbzrle"),
                       allow_postcopy: Optional[bool] = typer.Option(None, "--allow-postcopy/--no-allow-postcopy"),
                       url: Optional[str] = URL) -> None:
    """The cluster's default migration policy (a VM's own policy and each request override it)."""
    policy = _policy(downtime_ms, progress_timeout_s, completion_timeout_s_per_gib, auto_converge, xbzrle,
                     allow_postcopy)
    if policy is None:
        err_console.print("[red]error:[/] nothing to set; remedy: pass e.g. --downtime-ms 300 or --no-auto-converge")
        raise typer.Exit(2)
    out = run(lambda: Client(url).call("PATCH", f"/clusters/{name}", {"migration_policy": policy}))
    console.print(f"cluster [bold]{name}[/]: migration policy {out['migration_policy']}")


@cluster_app.command("list")
def cluster_list(url: Optional[str] = URL) -> None:
    table = Table("name", "EVC", "hosts")
    for c in run(lambda: Client(url).clusters()):
        table.add_row(c["name"], c["evc_mode"] or "off", ", ".join(c["hosts"]))
    console.print(table)


# -- tasks -------------------------------------------------------------------------------
@task_app.command("list")
def task_list(limit: int = 20, url: Optional[str] = URL) -> None:
    table = Table("id", "kind", "vm", "source → dest", "state", "phase", "progress", "error")
    for t in run(lambda: Client(url).tasks(limit)):
        table.add_row(t["id"][:8], t["kind"], t["vm_name"], f"{t['source']} → {t['destination']}", t["state"],
                      t["phase"], f"{t['progress']:.0f}%", (t.get("error") or {}).get("message", "")[:60])
    console.print(table)


@task_app.command("show")
def task_show(task_id: str, as_json: bool = typer.Option(False, "--json"), url: Optional[str] = URL) -> None:
    task = run(lambda: Client(url).task(task_id))
    if as_json:
        _print_json(task)
    else:
        print_outcome(task, console)


@task_app.command("cancel")
def task_cancel(task_id: str, url: Optional[str] = URL) -> None:
    """Cancel a running migration (before its switchover; the VM stays on the source)."""
    _act_and_follow(url, lambda c: c.cancel_task(task_id))


def _act_and_follow(url: Optional[str], act: Any) -> None:
    client = Client(url)
    t = run(lambda: act(client))
    t = run(lambda: follow(client, t["id"], console))
    print_outcome(t, console)


@task_app.command("force-complete")
def task_force_complete(task_id: str, url: Optional[str] = URL) -> None:
    """Switch a live migration over now: post-copy when its policy allows it, else the downtime limit is raised
    to cover what remains."""
    _act_and_follow(url, lambda c: c.force_complete(task_id))


# -- lab, image, demo ----------------------------------------------------------------------
@lab_app.command("up")
def lab_up(hosts: int = typer.Option(2, "--hosts"), link: Optional[str] = typer.Option(
               None, "--link", help="shape each host's migration link with tc: 1g or 10g"),
           root: Optional[Path] = None) -> None:
    from kvmotion.lab import lab, net
    from kvmotion.image.build import build_image

    try:
        image = build_image(log=lambda m: console.print(f"[dim]{m}[/]"))
        info = lab.up(hosts, root or lab.DEFAULT_ROOT, image_dir=image.kernel.parent.parent,
                      log=lambda m: console.print(m), link=link)
    except (net.LabError, KvmotionError) as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1)
    console.print(f"[green]lab up[/]: controller {info.controller_url}; admin token in "
                  f"{lab.admin_token_path(info.root)}")
    if root is not None and root != lab.DEFAULT_ROOT:
        console.print(f"export KVMOTION_URL={info.controller_url} KVMOTION_TOKEN_FILE={lab.admin_token_path(info.root)}")


@lab_app.command("down")
def lab_down(root: Optional[Path] = None) -> None:
    from kvmotion.lab import lab

    removed = lab.down(root or lab.DEFAULT_ROOT)
    console.print("removed: " + (", ".join(removed) if removed else "nothing (no lab was up)"))


@lab_app.command("status")
def lab_status(root: Optional[Path] = None) -> None:
    from kvmotion.lab import lab

    _print_json(lab.status(root or lab.DEFAULT_ROOT))


@image_app.command("build")
def image_build(force: bool = typer.Option(False, "--force")) -> None:
    from kvmotion.image.build import build_image

    try:
        img = build_image(force=force, log=lambda m: console.print(f"[dim]{m}[/]"))
    except Exception as exc:  # noqa: BLE001 - ImageBuildError names the fix
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1)
    console.print(f"guest image: kernel {img.kernel} ({img.version}), initrd {img.initrd}")


@bench_app.command("evacuate")
def bench_evacuate(vms: int = 4, memory: int = 512, link: str = "1g",
                   out: Optional[Path] = typer.Option(None, help="write the results as JSON")) -> None:
    """Evacuate N VMs over a shaped link, with admission control and with everything at once."""
    from kvmotion.bench.evacuate import run as run_bench

    results = run_bench(vms, memory, link, out, log=lambda m: console.print(f"[dim]{m}[/]"))
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
                                               "also: one-stream, multifd-N, xbzrle, no-xbzrle"),
                  repeat: int = typer.Option(3, min=3, max=50, help="runs per case; the order alternates"),
                  out: Path = typer.Option(Path("bench-results"), help="JSON, Markdown and PNG plots go here"),
                  root: Path = typer.Option(Path("/tmp/kvmotion-bench-migrate"), help="the bench lab's directory"),
                  prefix: str = typer.Option("kvbm", help="the bench lab's namespace prefix (unique per lab)")
                  ) -> None:
    """Sweep RAM × dirty rate × link; kvmotion against a plain QEMU migration with its defaults."""
    from kvmotion.bench import migrate as bench, report

    try:
        sweep = bench.Sweep(sizes=[int(x) for x in sizes.split(",")], dirty=[float(x) for x in dirty.split(",")],
                            links=links.split(","), variants=[v.strip() for v in variants.split(",") if v.strip()],
                            repeat=repeat)
        sweep.check()
    except ValueError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    result = bench.run(sweep, out, log=lambda m: console.print(m, markup=False, highlight=False), root=root,
                       prefix=prefix)
    console.print(report.markdown(result), markup=False, highlight=False)
    console.print(f"results: {out / 'bench-migrate.json'}, {out / 'bench-migrate.md'}, "
                  f"{out / 'remaining.png'}, {out / 'downtime.png'}")


@bench_app.command("soak")
def bench_soak(migrations: int = typer.Option(50, min=1, max=10000), dirty: float = typer.Option(20.0, help="MB/s"),
               memory: int = typer.Option(256, help="guest MiB")) -> None:
    """Back-and-forth live migrations of one dirtying guest; exit 1 on any failure or heartbeat break."""
    from kvmotion.bench import soak

    tally = soak.run(migrations, dirty, memory, log=lambda m: console.print(m, markup=False, highlight=False))
    t = tally.as_dict()
    console.print(f"soak: {t['migrations']} migrations, {t['failures']} failures, "
                  f"{len(t['heartbeat_breaks'])} heartbeat breaks, {len(t['guests'])} guest(s) used; "
                  f"downtime p50 {t['downtime_ms_p50']} ms, p99 {t['downtime_ms_p99']} ms, max {t['downtime_ms_max']} "
                  f"ms; total p50 {t['total_s_p50']} s")
    for g in t["guests"]:
        console.print(f"  guest {g['guest']}: boot {g['boot_id']}, survived {g['moves_survived']} moves, {g['ended']}")
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
    from kvmotion.bench import survival

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
    from kvmotion.bench import report

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


@app.command("demo")
def demo(memory: int = typer.Option(256, help="guest MiB"), dirty: float = typer.Option(0.0, help="MB/s"),
         keep: bool = typer.Option(False, help="leave the lab up")) -> None:
    """Lab up, a VM on h1 with a pinging client, live vMotion to h2, the figures, lab down."""
    from kvmotion.cli.demo import run_demo

    sys.exit(run_demo(console, memory_mb=memory, dirty=dirty, keep=keep))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
