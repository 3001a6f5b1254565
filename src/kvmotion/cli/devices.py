"""`kvmotion vm disk …` and `vm nic …`, and the parsing of `--disk size=GB,...` / `--nic PORTGROUP,...` (HTTP only)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, run
from kvmotion.common.errors import InvalidInputError
from kvmotion.models.devices import CACHE_HELP
from kvmotion.models.hardware import CACHE_MODES

disk_app = typer.Typer(help="disks of a VM (add/remove while off; virtio-scsi also while it runs)",
                       no_args_is_help=True)
nic_app = typer.Typer(help="network adapters of a VM (add/remove while it is off)", no_args_is_help=True)

DISK_KEYS = {"size": "size_gb", "datastore": "datastore", "bus": "bus", "format": "format", "cache": "cache"}
DISK_SYNTAX = "size=GB[,datastore=DS][,bus=virtio-blk|virtio-scsi|sata][,format=qcow2|raw][,cache=MODE]"
CACHE_CHOICES = ("auto", *CACHE_MODES)
NIC_KEYS = {"mac": "mac", "model": "model", "portgroup": "portgroup"}


def _pairs(text: str, keys: dict[str, str], what: str, example: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in keys or not value.strip():
            raise InvalidInputError(f"{what} {text!r}: {part!r} is not one of {', '.join(k + '=' for k in keys)}",
                                    remedy=f"write it like {example}")
        out[keys[key.strip()]] = value.strip()
    return out


def parse_disk(text: str) -> dict[str, Any]:
    """``size=GB[,datastore=DS][,bus=virtio-blk|virtio-scsi|sata][,format=qcow2|raw][,cache=MODE]`` as a
    DiskRequest body."""
    example = "size=2,bus=virtio-scsi,datastore=shared,format=qcow2,cache=none"
    out = _pairs(text, DISK_KEYS, "disk", example)
    if "size_gb" not in out:
        raise InvalidInputError(f"disk {text!r} has no size", remedy=f"write it like {example}")
    try:
        out["size_gb"] = int(out["size_gb"])
    except ValueError:
        raise InvalidInputError(f"disk size {out['size_gb']!r} is not a whole number of GB",
                                remedy=f"write it like {example}") from None
    if "cache" in out:
        out["cache"] = parse_cache(out["cache"], f"disk {text!r}")
    return out


def parse_cache(value: str, what: str = "disk") -> str:
    """A cache mode (or auto) as typed; anything else is refused naming the choices."""
    mode = value.strip().lower()
    if mode not in CACHE_CHOICES:
        raise InvalidInputError(f"{what}: cache {value!r} is not a cache mode",
                                remedy=f"use one of {', '.join(CACHE_CHOICES)} (auto: none on a shared datastore, "
                                       "writeback on a local one)")
    return mode


def parse_nic(text: str) -> dict[str, Any]:
    """``PORTGROUP[,mac=MAC][,model=virtio|e1000e]`` as a NicRequest body."""
    example = "'VM Network,model=virtio' or 'VLAN 100,mac=52:54:00:12:34:56'"
    first, _, rest = text.partition(",")
    if "=" in first:
        out = _pairs(text, NIC_KEYS, "NIC", example)
    else:
        out = {"portgroup": first.strip(), **(_pairs(rest, NIC_KEYS, "NIC", example) if rest.strip() else {})}
    if not out.get("portgroup"):
        raise InvalidInputError(f"NIC {text!r} names no port group", remedy=f"write it like {example}")
    return out


@disk_app.command("add")
def disk_add(vm: str, spec: str = typer.Argument(..., help=DISK_SYNTAX), url: Optional[str] = URL) -> None:
    """Add a disk: to a powered-off VM on any bus; to a running one on virtio-scsi (hot-plug)."""
    body = run(lambda: parse_disk(spec))
    out = run(lambda: Client(url).call("POST", f"/vms/{vm}/disks", body))
    disk = out["spec"]["disks"][-1]
    console.print(f"VM [bold]{out['name']}[/]: added {disk['id']} ({disk['bus']}, {disk['size_mb'] // 1024} GB "
                  f"{disk['format']} on {disk['datastore']}, cache {disk.get('cache') or 'auto'})")


@disk_app.command("cache")
def disk_cache(vm: str, disk: str = typer.Argument(..., help="disk id (disk2) or index (2)"),
               mode: str = typer.Argument(..., help=CACHE_HELP),
               url: Optional[str] = URL) -> None:
    """Set a disk's host cache mode on a powered-off VM (used from its next power-on)."""
    body = {"cache": run(lambda: parse_cache(mode, f"disk {disk}"))}
    out = run(lambda: Client(url).call("POST", f"/vms/{vm}/disks/{disk}/cache", body))
    found = next((d for i, d in enumerate(out["spec"]["disks"]) if disk in (d["id"], str(i))), None)
    console.print(f"VM [bold]{out['name']}[/]: {found['id'] if found else disk} cache "
                  f"{(found or {}).get('cache') or 'auto'} from its next power-on")


@disk_app.command("remove")
def disk_remove(vm: str, disk: str = typer.Argument(..., help="disk id (disk2) or index (2)"),
                keep_file: bool = typer.Option(False, "--keep-file", help="detach only: keep the image file"),
                url: Optional[str] = URL) -> None:
    """Remove a disk (its image is deleted unless --keep-file); a running VM: virtio-scsi disks only."""
    out = run(lambda: Client(url).call("POST", f"/vms/{vm}/disks/{disk}/remove", {"keep_file": keep_file}))
    console.print(f"VM [bold]{out['name']}[/]: disk {disk} removed; disks now "
                  f"{', '.join(d['id'] for d in out['spec']['disks']) or 'none'}")


@disk_app.command("list")
def disk_list(vm: str, url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).vm(vm))
    for i, d in enumerate(out["spec"]["disks"]):
        console.print(f"{i} {d['id']} {d.get('bus', 'virtio-blk')} unit={d.get('unit')} {d['format']} "
                      f"{d['size_mb']} MiB {d['datastore']}:{d['path']} cache={d.get('cache') or 'auto'}")


@nic_app.command("add")
def nic_add(vm: str, spec: str = typer.Argument(..., help="PORTGROUP[,mac=MAC][,model=virtio|e1000e]"),
            url: Optional[str] = URL) -> None:
    """Add a NIC to a powered-off VM; its MAC must be unique in the inventory (generated when left out)."""
    body = run(lambda: parse_nic(spec))
    out = run(lambda: Client(url).call("POST", f"/vms/{vm}/nics", body))
    nic = out["spec"]["nics"][-1]
    console.print(f"VM [bold]{out['name']}[/]: added {nic['id']} on {nic['portgroup']!r} ({nic['model']}, "
                  f"MAC {nic['mac']})")


@nic_app.command("remove")
def nic_remove(vm: str, nic: str = typer.Argument(..., help="NIC id, e.g. nic1"), url: Optional[str] = URL) -> None:
    out = run(lambda: Client(url).call("DELETE", f"/vms/{vm}/nics/{nic}"))
    console.print(f"VM [bold]{out['name']}[/]: {nic} removed; NICs now "
                  f"{', '.join(n['id'] for n in out['spec']['nics']) or 'none'}")
