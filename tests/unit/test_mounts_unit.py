"""Datastores of kind nfs (issue 19): the folder must be an NFS mount, else it is reported inaccessible.

The lab's kernel has no NFS client (no nfs in /proc/filesystems), so an NFS mount is given here as mountinfo text
in the kernel's format; the refusals run against this machine's real mounts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvmotion.agent import markers, mounts, setup_cmd
from kvmotion.agent.config import DATASTORE_ID_FILE, DatastoreMarker
from kvmotion.agent.facts import read_datastore
from kvmotion.common.errors import ConflictError

UUID = "0f1e2d3c-4b5a-4697-8877-665544332211"
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
301 27 0:53 / /srv/ds/shared rw,relatime shared:180 - nfs4 198.18.0.2:/export/shared rw,vers=4.2,rsize=1048576
302 27 0:54 / /srv/ds/with\\040space rw,relatime - nfs nas:/vol/a\\040b rw,vers=3
303 27 259:1 /local /srv/ds/stacked rw - ext4 /dev/nvme0n1p1 rw
304 27 0:55 / /srv/ds/stacked rw,relatime - nfs4 nas:/stacked rw
"""


def test_an_nfs_mount_is_found_with_its_export() -> None:
    assert mounts.nfs_problem(Path("/srv/ds/shared"), MOUNTINFO) == ("198.18.0.2:/export/shared", None)
    assert mounts.nfs_problem(Path("/srv/ds/with space"), MOUNTINFO) == ("nas:/vol/a b", None)
    assert mounts.nfs_problem(Path("/srv/ds/stacked"), MOUNTINFO) == ("nas:/stacked", None)   # the top one


def test_an_unmounted_or_local_folder_is_not_an_nfs_datastore() -> None:
    export, why = mounts.nfs_problem(Path("/srv/ds/missing"), MOUNTINFO)
    assert export is None and why is not None and "not a mount point" in why
    export, why = mounts.nfs_problem(Path("/"), MOUNTINFO)
    assert export is None and why is not None and "ext4" in why and "/dev/nvme0n1p1" in why


def test_a_datastore_of_kind_nfs_on_a_local_folder_is_inaccessible(tmp_path: Path) -> None:
    ds = tmp_path / "shared"
    ds.mkdir()
    (ds / DATASTORE_ID_FILE).write_text(json.dumps({"uuid": UUID, "name": "shared", "kind": "nfs", "shared": True}))
    fact = read_datastore(ds)                   # this machine's real mountinfo: tmp_path is no mount point
    assert fact.readable is False and fact.kind == "nfs" and fact.uuid == UUID
    assert fact.error is not None and "not a mount point" in fact.error and "mount it there" in fact.error
    (ds / DATASTORE_ID_FILE).write_text(json.dumps({"uuid": UUID, "name": "shared", "shared": True}))
    fact = read_datastore(ds)                   # the same folder as a plain directory datastore is fine
    assert fact.readable is True and fact.export is None


def test_an_nfs_datastore_is_shared() -> None:
    with pytest.raises(ValidationError, match="shared"):
        DatastoreMarker(uuid=UUID, name="nfs1", kind="nfs", shared=False)
    assert DatastoreMarker(uuid=UUID, name="nfs1", kind="nfs", shared=True).kind == "nfs"


def test_datastore_init_nfs_refuses_a_folder_that_is_no_nfs_mount(tmp_path: Path, capsys) -> None:
    ds = tmp_path / "shared"
    ds.mkdir()
    with pytest.raises(SystemExit):
        setup_cmd.main(["datastore", "init", str(ds), "--name", "shared", "--nfs"])
    err = capsys.readouterr().err
    assert "of kind nfs" in err and "not a mount point" in err and "mount the export" in err
    assert not (ds / DATASTORE_ID_FILE).exists()                 # nothing written
    setup_cmd.main(["datastore", "init", str(ds), "--name", "shared", "--shared"])
    with pytest.raises(ConflictError, match="kind directory") as exc:
        markers._check_same(ds, markers.read_marker(ds), "shared", True, "nfs")    # type: ignore[arg-type]
    assert "--nfs" in exc.value.remedy
