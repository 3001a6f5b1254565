"""Files the agent opens in a datastore (and the controller's secret files) are never reached through a link.

Security finding 5 of issue 19: a symlinked ``vmlinuz`` in a VM folder was relayed to another host, lease files
and the master key were opened without ``O_NOFOLLOW``. Every test plants a real link (or a hard link, a '..', a
folder swapped while the agent works) in a real folder under tmp_path, calls the agent's own code, and checks both
the refusal (a 4xx error naming the path and the fix) and that nothing outside the datastore was read or written.
No root-only tricks, no QEMU.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvmotion.agent import facts, imagelib, ovfpkg, storage
from kvmotion.agent.config import DATASTORE_ID_FILE
from kvmotion.agent.context import HostContext
from kvmotion.agent.hv.qemu.argv import build_argv
from kvmotion.agent.storage import AgentStorage, source_file
from kvmotion.common import confined
from kvmotion.common.errors import InvalidInputError, NotConfined
from kvmotion.controller.keys import MASTER_FILE, KeyProvider
from kvmotion.models.agent import DiskSpec
from kvmotion.models.images import OvfOpen

from test_input_unit import spec

SECRET = b"root's secret, outside every datastore\n"


class Agent(AgentStorage):
    """The agent's storage operations on one host with one datastore ``ds`` (no QEMU needed for these)."""

    def __init__(self, ctx: HostContext) -> None:
        self.cfg = SimpleNamespace(name="h1")  # type: ignore[assignment]
        self._ctx = ctx

    def context(self) -> HostContext:
        return self._ctx


@pytest.fixture
def box(tmp_path: Path) -> SimpleNamespace:
    """A datastore ``ds`` holding a kernel-boot VM's folder ``vm1``, and a secret file outside it."""
    ds, outside = tmp_path / "ds", tmp_path / "outside"
    (ds / "vm1").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(SECRET)
    for name in ("vmlinuz", "initrd.img", "vm1.qcow2"):
        (ds / "vm1" / name).write_bytes(b"the VM's own " + name.encode())
    ctx = HostContext(host_name="h1", accelerator="tcg", datastore_paths={"ds": ds}, bridges={})
    return SimpleNamespace(ds=ds, outside=outside, secret=secret, ctx=ctx, agent=Agent(ctx))


def refused(exc: pytest.ExceptionInfo[Any], reason: str, path: Path) -> None:
    """A 422 that names the offending path, why, and what to do."""
    err = exc.value
    assert isinstance(err, NotConfined) and err.http_status == 422, err
    assert err.details["reason"] == reason and str(path) in err.message, err.to_dict()
    assert err.remedy


# -- the VM folder relay (the reported hole) -------------------------------------------------------------------------

def test_the_relay_refuses_a_symlinked_vmlinuz(box: SimpleNamespace) -> None:
    link = box.ds / "vm1" / "vmlinuz"
    link.unlink()
    link.symlink_to(box.secret)
    with pytest.raises(NotConfined) as exc:
        box.agent.home_files(spec())
    refused(exc, "symlink", link)
    assert "symbolic link" in exc.value.message and "replace the link" in exc.value.remedy


def test_the_relay_does_not_follow_a_folder_swapped_for_a_link(box: SimpleNamespace, monkeypatch) -> None:
    """The VM folder passes its check, then is replaced by a link to another folder before its files are read:
    the read starts again from the datastore's root and meets the link."""
    for name in ("vmlinuz", "initrd.img"):
        (box.outside / name).write_bytes(SECRET)
    real = storage.present_home_names

    def swap_then_list(folder: Any, vm: Any) -> tuple[str, ...]:
        os.rename(box.ds / "vm1", box.ds / "vm1.moved")
        (box.ds / "vm1").symlink_to(box.outside, target_is_directory=True)
        return real(folder, vm)

    monkeypatch.setattr(storage, "present_home_names", swap_then_list)
    with pytest.raises(NotConfined) as exc:
        box.agent.home_files(spec())
    refused(exc, "symlink", box.ds / "vm1")


def test_a_copied_folder_is_not_written_through_a_planted_link(box: SimpleNamespace) -> None:
    """Storage vMotion copies the VM folder to the new datastore; a vm.json link planted there is not written
    through."""
    ds2 = box.ds.parent / "ds2"
    (ds2 / "vm1").mkdir(parents=True)
    (ds2 / "vm1" / "vm.json").symlink_to(box.secret)
    ctx = HostContext(host_name="h1", accelerator="tcg", datastore_paths={"ds": box.ds, "ds2": ds2}, bridges={})
    old = spec()
    with pytest.raises(NotConfined) as exc:
        Agent(ctx)._copy_home(old, old.model_copy(update={"boot_datastore": "ds2"}))
    refused(exc, "symlink", ds2 / "vm1" / "vm.json")
    assert box.secret.read_bytes() == SECRET


# -- leases (next to the disks, on the shared datastore) -------------------------------------------------------------

@pytest.mark.parametrize("lease", [".kvmotion.lease", ".vm1.qcow2.lease"])
def test_a_symlinked_lease_file_is_refused_not_written(box: SimpleNamespace, lease: str) -> None:
    link = box.ds / "vm1" / lease
    link.symlink_to(box.secret)
    with pytest.raises(NotConfined) as exc:
        box.agent.take_leases(spec(), expected_holder=None)
    refused(exc, "symlink", link)
    assert box.secret.read_bytes() == SECRET
    with pytest.raises(NotConfined):
        box.agent.lease_holders(spec())


def test_a_hard_linked_lease_file_is_not_written(box: SimpleNamespace) -> None:
    """A hard link is no symbolic link, but writing through it would change the file under its other name."""
    os.link(box.secret, box.ds / "vm1" / ".kvmotion.lease")
    with pytest.raises(NotConfined) as exc:
        box.agent.take_leases(spec(), expected_holder=None)
    refused(exc, "hardlink", box.ds / "vm1" / ".kvmotion.lease")
    assert box.secret.read_bytes() == SECRET


def test_leases_still_work_without_links(box: SimpleNamespace) -> None:
    lease = box.agent.take_leases(spec(), expected_holder=None)
    assert lease.host == "h1"
    assert set(box.agent.lease_holders(spec()).values()) == {"h1"}
    assert box.agent.release_leases(spec()) == 2


# -- the datastore's identity file, the controller's master key -------------------------------------------------------

def test_a_symlinked_datastore_marker_makes_the_datastore_unreadable(box: SimpleNamespace) -> None:
    forged = box.outside / "id.json"
    forged.write_text(json.dumps({"uuid": "forged", "name": "ds"}))
    (box.ds / DATASTORE_ID_FILE).symlink_to(forged)
    fact = facts.read_datastore(box.ds)
    assert not fact.readable and fact.uuid == "" and "symbolic link" in (fact.error or "")
    (box.ds / DATASTORE_ID_FILE).unlink()
    (box.ds / DATASTORE_ID_FILE).write_text(json.dumps({"uuid": "real", "name": "ds"}))
    assert facts.read_datastore(box.ds).uuid == "real"


def test_a_symlinked_master_key_is_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    foreign = tmp_path / "foreign.key"
    foreign.write_bytes(b"k" * 32)
    (pki / MASTER_FILE).symlink_to(foreign)
    with pytest.raises(NotConfined) as exc:
        KeyProvider.load_or_create(pki)
    refused(exc, "symlink", pki / MASTER_FILE)
    (pki / MASTER_FILE).unlink()
    keys = KeyProvider.load_or_create(pki)                # made anew: a regular 0600 file of 32 bytes
    st = (pki / MASTER_FILE).lstat()
    assert st.st_mode & 0o777 == 0o600 and st.st_size == 32
    passphrase, wrapped = keys.new_key("vm1/disk0")
    assert KeyProvider.load_or_create(pki).unwrap(wrapped, "vm1/disk0") == passphrase


# -- '..' and linked folders on the way ------------------------------------------------------------------------------

def test_a_dotdot_component_is_refused_even_when_it_stays_inside(box: SimpleNamespace) -> None:
    with pytest.raises(InvalidInputError):
        source_file(box.ctx, f"{box.ds}/vm1/../vm1/vm1.qcow2")
    assert source_file(box.ctx, f"{box.ds}/vm1/vm1.qcow2") == box.ds.resolve() / "vm1" / "vm1.qcow2"
    for call in (lambda: confined.open_in(box.ds, "vm1/../vm1/vmlinuz", os.O_RDONLY),
                 lambda: confined.stat_in(box.ds, "../outside/secret"),
                 lambda: confined.Place.of(box.ds, "vm1") / "../../outside/secret"):
        with pytest.raises(NotConfined) as exc:
            call()
        assert exc.value.details["reason"] == "parent"


def test_a_symlinked_intermediate_folder_is_refused(box: SimpleNamespace) -> None:
    """A folder on the way that is a link, even to a folder inside the datastore: not followed when the agent
    opens a file, nor when QEMU is given a disk path (checked before it starts)."""
    (box.ds / "vms").symlink_to(box.ds / "vm1", target_is_directory=True)
    with pytest.raises(NotConfined) as exc:
        confined.read_in(box.ds, "vms/vmlinuz", 1 << 20)
    refused(exc, "symlink", box.ds / "vms")
    with pytest.raises(NotConfined) as exc:
        build_argv(spec(disks=[DiskSpec(datastore="ds", path="vms/vm1.qcow2")]), box.ctx, box.ds / "run", False)
    refused(exc, "symlink", box.ds / "vms")


def test_a_symlinked_kernel_is_refused_before_qemu_starts(box: SimpleNamespace) -> None:
    (box.ds / "vm1" / "initrd.img").unlink()
    (box.ds / "vm1" / "initrd.img").symlink_to(box.secret)
    with pytest.raises(NotConfined) as exc:
        build_argv(spec(), box.ctx, box.ds / "run", incoming=False)
    refused(exc, "symlink", box.ds / "vm1" / "initrd.img")


def test_an_ova_is_not_unpacked_through_a_linked_import_folder(box: SimpleNamespace, tmp_path: Path) -> None:
    """The package comes from a configured import folder; the datastore's own import/ folder, where it is
    unpacked, is a link out of the datastore."""
    extra = tmp_path / "incoming"
    extra.mkdir()
    with tarfile.open(extra / "app.ova", "w") as tar:
        data = b"<Envelope/>"
        member = tarfile.TarInfo("app.ovf")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    (box.ds / "import").symlink_to(box.outside, target_is_directory=True)
    with pytest.raises(NotConfined) as exc:
        ovfpkg.open_package(box.ctx, OvfOpen(file=str(extra / "app.ova"), datastore="ds"), [extra])
    refused(exc, "symlink", box.ds / "import")
    assert sorted(p.name for p in box.outside.iterdir()) == ["secret"]


# -- the module itself: kinds of files ------------------------------------------------------------------------------

def test_only_regular_files_are_opened_and_a_fifo_never_blocks(box: SimpleNamespace) -> None:
    os.mkfifo(box.ds / "vm1" / "pipe")
    with pytest.raises(NotConfined) as exc:
        confined.read_in(box.ds, "vm1/pipe", 1024)          # a FIFO would block a plain open() for ever
    refused(exc, "not-regular", box.ds / "vm1" / "pipe")
    with pytest.raises(NotConfined) as exc:
        confined.open_in(box.ds, "vm1/vmlinuz/x", os.O_RDONLY)
    refused(exc, "not-directory", box.ds / "vm1" / "vmlinuz")
    with pytest.raises(FileNotFoundError):
        confined.read_in(box.ds, "vm1/missing", 1024)
    assert confined.read_in(box.ds, "vm1/vmlinuz", 1024) == b"the VM's own vmlinuz"
    assert confined.stat_in(box.ds, "nope/x") is None and confined.listdir_in(box.ds, "nope") == []


def test_import_leftovers_are_not_removed_through_a_linked_folder(box: SimpleNamespace) -> None:
    """A restarted agent removes its own half-written imports; an images/ folder that is a link is not entered."""
    decoy = box.outside / ".deb.importing-h1-0a1b"
    decoy.write_bytes(SECRET)
    (box.ds / "images").symlink_to(box.outside, target_is_directory=True)
    (box.ds / "import").mkdir()
    (box.ds / "import" / ".ova-h1-00ff").symlink_to(box.outside, target_is_directory=True)
    assert imagelib.remove_leftovers(box.ctx) == []
    assert decoy.read_bytes() == SECRET and box.secret.read_bytes() == SECRET
