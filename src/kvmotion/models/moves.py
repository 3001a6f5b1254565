"""Move kinds and phases: the names a task carries on the wire (API, CLI, journal)."""
from __future__ import annotations

from enum import StrEnum


class MoveKind(StrEnum):
    VMOTION = "vmotion"              # a running VM to another host, shared storage
    SVMOTION = "svmotion"            # Storage vMotion: a running VM's files to other datastores, same host
    XVMOTION = "xvmotion"            # shared-nothing: host and storage together, the VM runs on
    COLD = "cold"                    # a powered-off VM: copy, verify, re-register


class TaskKind(StrEnum):
    MAINTENANCE = "maintenance"      # a host's evacuation (not a move of its own: it submits moves)
    IMAGE_IMPORT = "image-import"    # a disk image copied into the library (vm_name: the image's name)
    INCOMING = "incoming"            # the destination's side of a move from another controller (same task id)


LIVE_KINDS = frozenset({MoveKind.VMOTION, MoveKind.XVMOTION})      # memory crosses hosts


class Phase(StrEnum):
    """Every phase of every kind; each kind declares which it uses, and in which order (migration.kinds)."""

    PRECHECK = "precheck"
    SHADOW = "shadow"                 # shadow VM on the destination
    DISKS = "disks"                   # shared-nothing: every disk mirrored to the destination over NBD
    PRECOPY = "precopy"               # iterative memory pre-copy with dirty tracking
    SWITCHOVER = "switchover"         # quiesce, last pages and device state
    POSTCOPY = "postcopy"             # (escalation) the guest runs on the destination and pulls the rest
    RESUME = "resume"                 # run on the destination, confirmed
    ANNOUNCE = "announce"             # RARP/GARP
    RELEASE = "release"               # locks to the destination, source freed, owner changes
    MIRROR = "mirror"                 # Storage vMotion: every moved disk mirrored on the host
    PIVOT = "pivot"                   # Storage vMotion: the VM switches to the new files
    VERIFY = "verify"                 # qemu-img check of the new files
    COPY = "copy"                     # cold: qemu-img convert + compare
    REGISTER = "register"             # cold: the inventory names the copies
    CLEANUP = "cleanup"               # the old files are removed
    ROLLBACK = "rollback"
    RECONCILE = "reconcile"           # after a controller restart: resolved from what the hosts report
    PLAN = "plan"                     # maintenance: which VMs go where
    EVACUATE = "evacuate"             # maintenance: the moves run
