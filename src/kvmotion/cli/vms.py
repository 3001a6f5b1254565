"""`kvmotion vm …`: create, power, change and move virtual machines; their CD/DVD media."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.cloudinit import cloud_init_request
from kvmotion.cli.devices import CACHE_HELP, DISK_SYNTAX, disk_app, nic_app, parse_cache, parse_disk, parse_nic
from kvmotion.cli.output import POLICY_HELP, URL, console, err_console, findings_table, policy_of, print_json, run
from kvmotion.cli.power import register as register_power
from kvmotion.cli.progress import follow, print_outcome
from kvmotion.cli.tasks import task_force_complete

IMAGE_CLONE_TIMEOUT_S = 3800.0    # longer than the controller's wait for the agent's clone
vm_app = typer.Typer(help="virtual machines", no_args_is_help=True)
cdrom_app = typer.Typer(help="CD/DVD media of a VM", no_args_is_help=True)
vm_app.add_typer(cdrom_app, name="cdrom")
vm_app.add_typer(disk_app, name="disk")
vm_app.add_typer(nic_app, name="nic")


@vm_app.command("create")
def vm_create(name: str, host: str = typer.Option(..., "--host"), memory: int = typer.Option(256, help="MiB"),
              vcpus: int = typer.Option(1, "--vcpus", "--cpus"), datastore: Optional[str] = None, network: str = "VM Network",
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
              image: Optional[str] = typer.Option(None, help="a library image (kvmotion image list), or DATASTORE:path/"
                                                             "to/file: make the boot disk from this disk image"),
              clone: str = typer.Option("full", help="full (a converted copy) | linked (an overlay, same datastore)"),
              disk_size: Optional[int] = typer.Option(None, "--disk-size",
                                                      help="boot disk size, GB (grown, never shrunk)"),
              boot: Optional[str] = typer.Option(None, help="kernel | disk (default: disk with --image)"),
              firmware: str = typer.Option("bios", help="bios | uefi"),
              secure_boot: bool = typer.Option(False, "--secure-boot", help="UEFI Secure Boot (Microsoft keys)"),
              gateway: Optional[str] = typer.Option(None, help="default gateway of a disk-booted guest"),
              disk: Optional[list[str]] = typer.Option(None, "--disk", help="more disks (repeatable): " + DISK_SYNTAX),
              disk_cache: str = typer.Option("auto", "--disk-cache", help="the boot and data disks' " + CACHE_HELP),
              nic: Optional[list[str]] = typer.Option(None, "--nic", help="a NIC (repeatable; replaces --network): "
                                                      "PORTGROUP[,mac=MAC][,model=virtio|e1000e]"),
              machine: Optional[str] = typer.Option(None, help="machine type, e.g. pc-q35-7.2 | pc-i440fx-7.2"),
              sockets: Optional[int] = typer.Option(None, help="vCPU topology (with --cores, --threads)"),
              cores: Optional[int] = None, threads: Optional[int] = None,
              cloud_init: Optional[Path] = typer.Option(None, "--cloud-init", help="cloud-init user-data: "
                                                        "#cloud-config YAML or a #! script (a NoCloud seed ISO)"),
              ssh_key: Optional[Path] = typer.Option(None, "--ssh-key", help="public key file: added to the "
                                                     "cloud-config's ssh_authorized_keys"),
              network_config: Optional[Path] = typer.Option(None, "--network-config",
                                                            help="cloud-init network config (YAML v1/v2)"),
              meta_data: Optional[Path] = typer.Option(None, "--meta-data", help="cloud-init meta-data (YAML; "
                                                       "default: instance-id = UUID, local-hostname = NAME)"),
              url: Optional[str] = URL) -> None:
    """Create a VM; sockets x cores x threads must equal --vcpus (alias --cpus)."""
    seed = run(lambda: cloud_init_request(cloud_init, ssh_key, network_config, meta_data))
    devices = run(lambda: {"disks": [parse_disk(d) for d in disk or []], "nics": [parse_nic(n) for n in nic or []],
                           "disk_cache": parse_cache(disk_cache, "--disk-cache"),
                           "machine": machine, "sockets": sockets, "cores": cores, "threads": threads})
    mask = [f for f in (cpu_mask or "").split(",") if f]
    boot_opts = {"image": image, "clone": clone, "disk_size_gb": disk_size, "boot": boot, "firmware": firmware,
                 "secure_boot": secure_boot, "gateway": gateway}
    fields = dict(name=name, host=host, memory_mb=memory, vcpus=vcpus, datastore=datastore, network=network,
                  disk_mb=disk_mb, ip=ip, dirty_mb_s=dirty, dirty_region_mb=dirty_region_mb, cpu_model=cpu,
                  cpu_mask=mask, encrypted_vmotion=encrypted_vmotion, marker=marker, encrypted_disk=encrypted_disk,
                  data_disk_mb=data_disk_mb, data_datastore=data_datastore, disk_format=disk_format,
                  records_rate=records_rate, cloud_init=seed, **boot_opts, **devices)
    timeout = IMAGE_CLONE_TIMEOUT_S if image else 60.0     # a full clone converts the whole image first
    vm = run(lambda: Client(url, timeout=timeout).create_vm(**fields))
    spec = vm['spec']
    console.print(f"created VM [bold]{vm['name']}[/] ({vm['uuid']}) on {vm['host']}, "
                  f"datastore {spec['boot_datastore']}, ip {spec['guest_ip']}, "
                  f"boot {spec.get('boot', 'kernel')} under {spec.get('firmware', 'bios')}"
                  + (f", cloud-init seed {spec['cdroms'][0]['path']} on cd0" if seed else ""))


@vm_app.command("import-ovf")
def vm_import_ovf(file: str = typer.Argument(..., help="FILE.ova or FILE.ovf: an absolute path on the host, in the "
                                             "datastore's import/ folder"),
                  host: str = typer.Option(..., "--host"), datastore: str = typer.Option(..., "--datastore"),
                  name: Optional[str] = typer.Option(None, "--name", help="the VM's name (default: the OVF's)"),
                  network: Optional[str] = typer.Option(None, help="the port group its NICs join (default: VM Network)"),
                  url: Optional[str] = URL) -> None:
    """A VM exported from VMware (OVF/OVA): vCPUs, memory, its disk (vmdk → library image → full clone), NICs and
    firmware from the descriptor; created powered off."""
    with console.status(f"importing {file} (manifest, disk convert, clone)…", spinner="dots"):
        vm = run(lambda: Client(url, timeout=2 * IMAGE_CLONE_TIMEOUT_S).import_ovf(file, host, datastore, name,
                                                                                   network))
    spec = vm["spec"]
    console.print(f"imported VM [bold]{vm['name']}[/] ({vm['uuid']}) on {vm['host']}: {spec['vcpus']} vCPU, "
                  f"{spec['memory_mb']} MiB, {len(spec['nics'])} NIC(s), firmware {spec['firmware']}, "
                  f"disk from image {spec.get('source_image')}; powered off")


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
    policy = policy_of(downtime_ms, progress_timeout_s, completion_timeout_s_per_gib, auto_converge, xbzrle,
                     allow_postcopy)
    out = run(lambda: Client(url).update_vm(vm, encrypted_vmotion=encrypted_vmotion, migration_policy=policy))
    console.print(f"VM [bold]{out['name']}[/]: encrypted vMotion {out['spec']['encrypted_vmotion']}, "
                  f"migration policy {out['migration_policy'] or 'inherited'}")


@vm_app.command("start")
def vm_start(vm: str, url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).start_vm(vm))
    console.print(f"VM [bold]{out['name']}[/] powered on on {out['host']} (pid {out['runtime']['pid']})")


@vm_app.command("stop")
def vm_stop(vm: str, url: Optional[str] = URL) -> None:
    """Hard stop: QEMU quits at once, like pulling the power cord; the guest is not asked (see `vm shutdown`)."""
    out = run(lambda: Client(url).stop_vm(vm))
    console.print(f"VM [bold]{out['name']}[/] powered off")


@vm_app.command("delete")
def vm_delete(vm: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).delete_vm(vm))
    console.print(f"VM [bold]{vm}[/] deleted")


@vm_app.command("list")
def vm_list(host: Optional[str] = typer.Option(None, "--host", help="only the VMs of this host"),
            power_state: Optional[str] = typer.Option(None, "--power-state", help="poweredOn | poweredOff"),
            url: Optional[str] = URL) -> None:
    """Every VM, by name (the controller's pages read one after the other)."""
    table = Table("name", "host", "power", "memory MiB", "datastore", "ip", "uuid")
    for v in run(lambda: Client(url).vms(host=host, power_state=power_state)):
        s = v["spec"]
        table.add_row(v["name"], v["host"], v["power_state"], str(s["memory_mb"]), s["boot_datastore"],
                      s.get("guest_ip") or "-", v["uuid"])
    console.print(table)


@vm_app.command("show")
def vm_show(vm: str, refresh_guest: bool = typer.Option(False, "--refresh-guest", help="read the guest agent's "
                                                        "facts now (else cached up to 30 s)"),
            url: Optional[str] = URL) -> None:
    """The VM, with its runtime; runtime.guest is what its guest agent tells (or "not answering")."""
    print_json(run(lambda: Client(url).vm(vm, refresh_guest=refresh_guest)))


def check_migration(client: Client, vm: str, host: str | None, **opts: Any) -> int:
    """Print every finding; 0 when nothing blocks the move, 3 when something does."""
    findings = run(lambda: client.validate(vm, host, **opts))
    errors = [f for f in findings if f["severity"] == "error"]
    where = " ".join(x for x in (host, opts.get("datastore")) if x) or "new placement"
    where += f" of controller {opts['controller']}" if opts.get("controller") else ""
    console.print(findings_table(findings, f"compatibility: {vm} → {where}"))
    console.print(f"[red]{len(errors)} error(s): the migration would be refused[/]" if errors
                  else "[green]no errors: the migration can start[/]")
    return 3 if errors else 0


def parse_pairs(items: list[str], option: str, form: str, example: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            err_console.print(f"[red]error:[/] {option} {item!r}: write it as {form}, e.g. {option} {example}")
            raise typer.Exit(2)
        out[key] = value
    return out


def parse_disk_map(items: list[str]) -> dict[str, str]:
    return parse_pairs(items, "--disk", "INDEX=DATASTORE", "0=shared")


@vm_app.command("validate")
def vm_validate(vm: str, host: Optional[str] = typer.Option(None, "--host"),
                datastore: Optional[str] = typer.Option(None, "--datastore"),
                controller: Optional[str] = typer.Option(None, "--controller", help="a host of another controller"),
                network: list[str] = typer.Option([], "--network", help="SOURCE_PG=DESTINATION_PG"),
                url: Optional[str] = URL) -> None:
    """Every compatibility finding for moving VM to HOST and/or DATASTORE, at once (exit 3 on errors); with
    --controller both controllers' findings, each marked with its side."""
    nets = parse_pairs(network, "--network", "SOURCE_PG=DESTINATION_PG", "'VM Network=Prod'")
    raise typer.Exit(check_migration(Client(url), vm, host, datastore=datastore, controller=controller,
                                     networks=nets))


def _force_complete(client: Client, vm: str, wait: bool, url: Optional[str]) -> None:
    """Switch the VM's running live migration over now (``vm migrate --force-complete``)."""
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


@vm_app.command("migrate")
def vm_migrate(vm: str, host: Optional[str] = typer.Option(None, "--host", help="destination host"),
               controller: Optional[str] = typer.Option(None, "--controller", help="cross-controller vMotion: the "
                                                        "domain member that manages --host (kvmotion domain list)"),
               network: list[str] = typer.Option([], "--network", help="cross-controller: map a port group, "
                                                 "e.g. --network 'VM Network=Prod'"),
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
               guest_first: Optional[bool] = typer.Option(None, "--guest-first/--no-guest-first",
                                                          help="the stream yields the host CPU to the guest's "
                                                               "vCPUs (default: on)"),
               wait: bool = typer.Option(True, help="follow the task and print its summary"),
               check: bool = typer.Option(False, "--check", help="only print the compatibility findings"),
               force_complete: bool = typer.Option(False, "--force-complete",
                                                   help="switch the VM's running live migration over now "
                                                        "(post-copy when its policy allows it)"),
               url: Optional[str] = URL) -> None:
    """Move a VM: vMotion (--host), Storage vMotion (--datastore/--disk), both (shared-nothing), or cold."""
    client = Client(url)
    if force_complete:
        _force_complete(client, vm, wait, url)
        return
    opts: dict[str, Any] = {"datastore": datastore, "disks": parse_disk_map(disk), "disk_format": disk_format,
                            "disk_mbps": disk_mbps, "controller": controller,
                            "networks": parse_pairs(network, "--network", "SOURCE_PG=DESTINATION_PG", "'VM Network=Prod'")}
    if check:
        raise typer.Exit(check_migration(client, vm, host, **opts))
    task = run(lambda: client.migrate(vm, host, downtime_ms=downtime_ms, max_bandwidth_mbps=max_bandwidth_mbps,
                                      priority=priority, auto_converge=auto_converge,
                                      progress_timeout_s=progress_timeout_s, allow_postcopy=allow_postcopy, xbzrle=xbzrle,
                                      postcopy_bandwidth_mbps=postcopy_mbps, guest_first=guest_first, **opts))
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
                      None, help="an ISO image, relative to a datastore (blocks a move only if the destination does not "
                                  "see that datastore)"),
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


register_power(vm_app)       # shutdown, reboot, guest (kvmotion.cli.power)
