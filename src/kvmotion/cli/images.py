"""`kvmotion image …`: the image library (import, list, show, delete). The lab plugin adds `image build` to this
group (command groups of the same name are merged, see :mod:`kvmotion.cli.plugins`)."""
from __future__ import annotations

import datetime
from typing import Any, Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, err_console, print_json, run
from kvmotion.cli.progress import follow

IMPORT_TIMEOUT_S = 3800.0       # longer than the controller's wait for the agent's convert, check and hash
CHECK_TIMEOUT_S = 800.0         # the request itself: the agent's qemu-img info, check and measure
image_app = typer.Typer(help="disk images: the library (import, list, show, delete)", no_args_is_help=True)


def size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def failed(task: dict[str, Any]) -> None:
    """A task's error, as `run` prints a refused request; exit 2 (bad input) or 1."""
    err = task.get("error") or {}
    err_console.print(f"[red]error:[/] {err.get('message', task['state'])}")
    if err.get("remedy"):
        err_console.print(f"[yellow]fix:[/] {err['remedy']}")
    raise typer.Exit(2 if err.get("code") in ("NOT_FOUND", "INVALID_INPUT", "CONFLICT") else 1)


@image_app.command("import")
def image_import(name: str = typer.Argument(..., help="the image's name in the library"),
                 file: str = typer.Argument(..., help="absolute path on the datastore's host, in the datastore's "
                                            "import/ folder (or an import_dirs folder of the agent's configuration)"),
                 datastore: str = typer.Option(..., "--datastore", help="the datastore that stores it (images/)"),
                 host: Optional[str] = typer.Option(None, "--host", help="the host that reads FILE (default: one "
                                                    "that mounts the datastore)"),
                 url: Optional[str] = URL) -> None:
    """Import a qcow2, raw, vmdk, vhdx or vdi file: detected, stored as qcow2, checked, checksummed."""
    client = Client(url, timeout=CHECK_TIMEOUT_S)
    with console.status(f"checking {file} (qemu-img info, check, measure)…", spinner="dots"):
        task = run(lambda: client.import_image(name=name, file=file, datastore=datastore, host=host))
    task = run(lambda: follow(Client(url), task["id"], console, poll_s=0.5, timeout_s=IMPORT_TIMEOUT_S))
    if task["state"] != "success":
        failed(task)
    out = task["result"]
    console.print(f"image [bold]{out['name']}[/]: {out['source_format']} → qcow2, "
                  f"{size(out['virtual_bytes'])} virtual, {size(out['file_bytes'])} stored on "
                  f"{', '.join(c['datastore'] for c in out['copies'])}, sha256 {out['sha256'][:16]}…")


@image_app.command("list")
def image_list(url: Optional[str] = URL) -> None:
    """The library: each image's state, source format, sizes, datastores and checksum."""
    table = Table("name", "state", "from", "virtual", "stored", "datastores", "sha256", "created")
    for i in run(lambda: Client(url).images()):
        table.add_row(i["name"], i["state"], i["source_format"] or "-", size(i["virtual_bytes"]),
                      size(i["file_bytes"]), ", ".join(c["datastore"] for c in i["copies"]), i["sha256"][:12] or "-",
                      datetime.datetime.fromtimestamp(i["created_at"]).strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@image_app.command("show")
def image_show(name: str, url: Optional[str] = URL) -> None:
    """One image, with the VMs made from it."""
    print_json(run(lambda: Client(url).image(name)))


@image_app.command("delete")
def image_delete(name: str, url: Optional[str] = URL) -> None:
    """Delete the image and every copy; refused while a VM was made from it."""
    run(lambda: Client(url).delete_image(name))
    console.print(f"image [bold]{name}[/] deleted")
