"""Taking the lab's network down: exactly what the record names, newest first, and nothing else."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kvmotion_lab.netns import LabError, ip_cmd, kill_netns_processes, netns_exists, root_link_exists, sysctl_get, sysctl_set
from kvmotion_lab.netrecord import Record

log = logging.getLogger(__name__)


def _remove(obj: dict[str, Any], own_netns: set[str]) -> str | None:
    """Remove one recorded object; return a description if it existed."""
    kind = obj.get("kind")
    if kind == "netns":
        name = obj["name"]
        if not netns_exists(name):
            return None
        killed = kill_netns_processes(name)
        cp = ip_cmd(None, "netns", "del", name, check=False)
        if cp.returncode != 0 and netns_exists(name):
            raise LabError(f"cannot delete netns {name}: {cp.stderr.strip()}")
        return f"netns {name}" + (f" (killed pids {killed})" if killed else "")
    if kind == "link":
        name, ns = obj["name"], obj.get("netns")
        if ns is not None:
            if ns in own_netns:
                return None  # goes away with its namespace
            if not netns_exists(ns):
                return None
            cp = ip_cmd(ns, "link", "del", "dev", name, check=False)
        else:
            if not root_link_exists(name):
                return None
            cp = ip_cmd(None, "link", "del", "dev", name, check=False)
        if cp.returncode != 0:
            if "cannot find" in cp.stderr.lower() or "does not exist" in cp.stderr.lower():
                return None
            raise LabError(f"cannot delete link {name}: {cp.stderr.strip()}")
        return f"link {name}" + (f" (netns {ns})" if ns else "")
    if kind == "sysctl":
        ns, key, old = obj.get("netns"), obj["key"], str(obj["old"])
        if ns is not None and (ns in own_netns or not netns_exists(ns)):
            return None  # per-netns setting disappears with the namespace
        cur = sysctl_get(ns, key)
        if cur is None or cur == old:
            return None
        sysctl_set(ns, key, old)
        return f"sysctl {key}={old}" + (f" (netns {ns})" if ns else "")
    raise LabError(f"unknown object in lab record: {obj!r}; remove it by hand")


def lab_down(state_file: Path) -> list[str]:
    """Remove exactly what *state_file* records, newest first; idempotent.

    Returns descriptions of what was actually removed/restored.  The state
    file is deleted when everything is gone; if something could not be
    removed the record keeps just those objects and LabError is raised.
    """
    state_file = Path(state_file)
    rec = Record.load(state_file)
    if rec is None:
        return []
    own_netns = {o["name"] for o in rec.objects if o.get("kind") == "netns"}
    removed: list[str] = []
    failed: list[dict[str, Any]] = []
    errors: list[str] = []
    for obj in reversed(list(rec.objects)):
        try:
            what = _remove(obj, own_netns)
        except LabError as e:
            failed.append(obj)
            errors.append(str(e))
            continue
        if what:
            removed.append(what)
            log.info("removed %s", what)
    if failed:
        rec.data["objects"] = list(reversed(failed))
        rec.data["complete"] = False
        rec.save()
        raise LabError("lab_down could not remove everything: " + "; ".join(errors) + f" (record kept in {state_file})")
    try:
        state_file.unlink()
    except FileNotFoundError:
        pass
    state_file.with_name(state_file.name + ".tmp").unlink(missing_ok=True)
    return removed
