"""The image library on a host and in the controller, with real qemu-img on small images in tmp folders: what is
imported (qcow2, raw, vmdk, vhdx, vdi → qcow2, checked, hashed), what is refused (and that nothing is left behind),
where a file to import may be, OVF descriptors and OVA packages, the library's records, and the CLI's merged
`image` group."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvmotion.agent import imagelib, ovfpkg
from kvmotion.agent.context import HostContext
from kvmotion.agent.importjob import ImportJobs
from kvmotion.common.errors import ConflictError, DeadlineExceeded, InvalidInputError, NotFoundError
from kvmotion.controller import imagestore, ovf
from kvmotion.controller.db import VM, Host, make_engine, make_sessionmaker
from kvmotion.models.agent import DiskSpec, VMSpec
from kvmotion.models.api import VMCreate
from kvmotion.models.images import AgentImageImport, AgentImageResult, AgentImportStatus, OvfClose, OvfOpen

MIB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture()
def ds(tmp_path: Path) -> Path:
    root = tmp_path / "ds1"
    (root / "import").mkdir(parents=True)
    return root


@pytest.fixture()
def ctx(ds: Path) -> HostContext:
    return HostContext("h1", "tcg", {"ds1": ds}, {})


def _import(ctx: HostContext, file: Path | str, name: str = "img1", **kw: object) -> AgentImageResult:
    return imagelib.import_image(ctx, AgentImageImport(name=name, file=str(file), datastore="ds1"), [], **kw)


def _left(ds: Path) -> list[str]:
    images = ds / "images"
    return sorted(p.name for p in images.iterdir()) if images.exists() else []


def _data_image(path: Path, fmt: str, mib: int = 4) -> Path:
    raw = path.with_suffix(".src")
    raw.write_bytes(b"\x00" * 512 + os.urandom(mib * MIB - 512))
    if fmt == "raw":
        raw.rename(path)
    else:
        qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(path))
        raw.unlink()
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk", "vhdx", "vdi"])
def test_each_format_is_stored_as_a_checked_hashed_qcow2(ctx: HostContext, ds: Path, fmt: str) -> None:
    src = _data_image(ds / "import" / f"disk.{fmt}", fmt)
    out = _import(ctx, src)
    stored = ds / "images" / "img1.qcow2"
    assert (out.source_format, out.path, out.virtual_bytes) == (fmt, "images/img1.qcow2", 4 * MIB)
    assert out.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert out.file_bytes == stored.stat().st_size
    assert imagelib.inspect(stored)["format"] == "qcow2"
    assert _left(ds) == ["img1.qcow2"]                 # no temporary file stays


def _truncated_qcow2(path: Path) -> Path:
    _data_image(path, "qcow2")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    return path


def _bad(kind: str, folder: Path) -> Path:
    path = folder / f"bad-{kind}"
    if kind == "text":
        path.write_text("this is a README, not a disk image\n" * 100)
    elif kind == "text-512":                           # a raw-sized text file is still no image
        path.write_bytes((b"x" * 511 + b"\n") * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "unknown-format":
        qemu_img("create", "-q", "-f", "qed", str(path), "1M")
    elif kind == "truncated-qcow2":
        _truncated_qcow2(path)
    elif kind == "chain":
        qemu_img("create", "-q", "-f", "qcow2", str(folder / "base.qcow2"), "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(path))
    elif kind == "vmdk-extent-outside":
        path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n'
                        'ddb.virtualHWVersion = "4"\n')
    return path


@pytest.mark.parametrize("kind", ["text", "text-512", "empty", "unknown-format", "truncated-qcow2", "chain",
                                  "vmdk-extent-outside"])
def test_bad_input_is_refused_with_the_fix_and_leaves_nothing(ctx: HostContext, ds: Path, kind: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        _import(ctx, _bad(kind, ds / "import"))
    assert err.value.remedy
    assert _left(ds) == []


def test_no_space_on_the_datastore(ctx: HostContext, ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _data_image(ds / "import" / "d.raw", "raw")
    real = imagelib.shutil.disk_usage
    monkeypatch.setattr(imagelib.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * MIB))
    with pytest.raises(ConflictError) as err:
        _import(ctx, src)
    assert err.value.details["free_mb"] == 2 and "free space" in err.value.remedy
    assert _left(ds) == []


def test_a_failing_convert_removes_its_temporary_file(ctx: HostContext, ds: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = _data_image(ds / "import" / "d.raw", "raw")
    def run(argv: list[str], timeout: float, on_percent) -> subprocess.CompletedProcess[str]:
        Path(argv[-1]).write_bytes(b"partial")             # as if the disk filled up half way
        return subprocess.CompletedProcess(argv, 1, "", "No space left on device")
    monkeypatch.setattr(imagelib, "run_with_progress", run)
    with pytest.raises(InvalidInputError):
        _import(ctx, src)
    assert _left(ds) == []


def test_the_copy_reports_its_phases_and_the_converts_percent(ctx: HostContext, ds: Path) -> None:
    seen: list[tuple[str, float]] = []
    _import(ctx, _data_image(ds / "import" / "d.vdi", "vdi", mib=8), report=lambda p, pct: seen.append((p, pct)))
    phases = [p for p, _ in seen]
    assert phases[0] == "convert" and phases[-2:] == ["check", "checksum"]
    assert max(pct for p, pct in seen if p == "convert") == 100.0


def test_a_convert_past_its_deadline_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(DeadlineExceeded):
        imagelib.run_with_progress(["sleep", "30"], 0.5, lambda pct: None)
    out = imagelib.run_with_progress(["sh", "-c", "printf '(50.00/100%%)\\r(100.00/100%%)\\r'; echo oops >&2"],
                                     10, lambda pct: None)
    assert (out.returncode, out.stderr.strip()) == (0, "oops")


def test_an_agent_import_job_checks_first_then_copies_in_the_background(ctx: HostContext, ds: Path) -> None:
    jobs = ImportJobs()

    async def flow() -> AgentImportStatus:
        with pytest.raises(InvalidInputError):            # bad input fails the request itself, no job
            await jobs.start(ctx, AgentImageImport(name="t", file=str(_bad("text", ds / "import")),
                                                   datastore="ds1"), [])
        assert jobs.jobs == {}
        job = await jobs.start(ctx, AgentImageImport(name="ok", file=str(_data_image(ds / "import" / "d.raw", "raw")),
                                                     datastore="ds1"), [])
        while jobs.status(job.job).state == "running":
            await asyncio.sleep(0.05)
        return jobs.status(job.job)
    done = asyncio.run(flow())
    assert (done.state, done.percent, done.result.path if done.result else None) == (
        "success", 100.0, "images/ok.qcow2")
    with pytest.raises(NotFoundError):
        jobs.status("nope")


def test_an_existing_name_is_never_overwritten(ctx: HostContext, ds: Path) -> None:
    src = _data_image(ds / "import" / "d.raw", "raw")
    _import(ctx, src)
    before = (ds / "images" / "img1.qcow2").read_bytes()
    with pytest.raises(ConflictError):
        _import(ctx, src)
    assert (ds / "images" / "img1.qcow2").read_bytes() == before and _left(ds) == ["img1.qcow2"]


def test_an_unknown_datastore_is_refused(ctx: HostContext, ds: Path) -> None:
    with pytest.raises(ConflictError) as err:
        imagelib.import_image(ctx, AgentImageImport(name="x", file=str(ds / "import" / "d"), datastore="nope"), [])
    assert err.value.details["datastore"] == "nope"


def test_where_a_file_to_import_may_be(ctx: HostContext, ds: Path, tmp_path: Path) -> None:
    imp = ds / "import"
    _data_image(tmp_path / "outside.raw", "raw")
    _data_image(imp / "ok.raw", "raw")
    (imp / "link.raw").symlink_to(tmp_path / "outside.raw")
    (imp / "inner-link.raw").symlink_to(imp / "ok.raw")       # even a link that stays inside
    (imp / "sub").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (imp / "dirlink").symlink_to(tmp_path / "elsewhere")
    _data_image(tmp_path / "elsewhere" / "x.raw", "raw")
    os.mkfifo(imp / "fifo")
    os.mknod(imp / "null", 0o600 | 0o020000, os.makedev(1, 3))   # a character device (/dev/null's numbers)
    roots = imagelib.import_roots(ctx, "ds1", [])
    assert imagelib.confined_file(str(imp / "ok.raw"), roots) == imp / "ok.raw"
    refused = {str(tmp_path / "outside.raw"): InvalidInputError, "relative/ok.raw": InvalidInputError,
               f"{imp}/../import/ok.raw": InvalidInputError, str(imp / "link.raw"): InvalidInputError,
               str(imp / "inner-link.raw"): InvalidInputError, str(imp / "dirlink" / "x.raw"): InvalidInputError,
               str(imp / "fifo"): InvalidInputError, str(imp / "null"): InvalidInputError,
               str(imp / "sub"): InvalidInputError, str(imp / "missing.raw"): NotFoundError,
               str(ds / "images" / "x.qcow2"): InvalidInputError}
    for path, error in refused.items():
        with pytest.raises(error):
            imagelib.confined_file(path, roots)
    extra = tmp_path / "elsewhere"
    assert imagelib.confined_file(str(extra / "x.raw"), imagelib.import_roots(ctx, "ds1", [extra]))


def test_remove_image(ctx: HostContext, ds: Path) -> None:
    _import(ctx, _data_image(ds / "import" / "d.raw", "raw"))
    assert imagelib.remove_image(ctx, "ds1", "img1") and not imagelib.remove_image(ctx, "ds1", "img1")
    assert _left(ds) == []


# -- OVF descriptors ----------------------------------------------------------------------------------------
def descriptor(disks: int = 1, efi: bool = True, macs: tuple[str, ...] = ("00:50:56:aa:bb:01",),
               memory: str = '<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>'
                             '<rasd:VirtualQuantity>1024</rasd:VirtualQuantity>') -> str:
    files = "".join(f'<File ovf:href="disk{i}.vmdk" ovf:id="file{i}" ovf:size="1"/>' for i in range(disks))
    dsec = "".join(f'<Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk{i}" '
                   f'ovf:fileRef="file{i}" ovf:format="http://www.vmware.com/interfaces/specifications/'
                   f'vmdk.html#streamOptimized"/>' for i in range(disks))
    items = "".join(f'<Item><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource><rasd:InstanceID>{10 + i}'
                    f'</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>' for i in range(disks))
    items += "".join(f'<Item><rasd:Address>{m}</rasd:Address><rasd:Connection>VM Network</rasd:Connection>'
                     f'<rasd:ResourceType>10</rasd:ResourceType></Item>' for m in macs)
    fw = '<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>' if efi else ""
    return f'''<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vmw="http://www.vmware.com/schema/ovf">
 <References>{files}</References>
 <DiskSection><Info>disks</Info>{dsec}</DiskSection>
 <NetworkSection><Info>nets</Info><Network ovf:name="VM Network"/></NetworkSection>
 <VirtualSystem ovf:id="web 01">
  <Info>a VM</Info><Name>web 01</Name>
  <VirtualHardwareSection><Info>hw</Info>
   <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
   <Item>{memory}<rasd:ResourceType>4</rasd:ResourceType></Item>
   {items}{fw}
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>'''


def test_an_ovf_descriptor_maps_to_a_vm() -> None:
    m = ovf.parse(descriptor(macs=("00:50:56:AA:BB:01", "00:50:56:aa:bb:02")))
    assert (m.name, m.vcpus, m.memory_mb, m.firmware) == ("web-01", 2, 1024, "uefi")
    assert [(d.file, d.capacity_bytes) for d in m.disks] == [("disk0.vmdk", 1 << 30)]
    assert [n.mac for n in m.nics] == ["00:50:56:aa:bb:01", "00:50:56:aa:bb:02"]
    bios = ovf.parse(descriptor(efi=False, macs=(), memory='<rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>'
                                                          '<rasd:VirtualQuantity>2</rasd:VirtualQuantity>'))
    assert (bios.firmware, bios.memory_mb, bios.nics) == ("bios", 2048, [])
    assert ovf.parse(descriptor().replace('byte * 2^30"', 'byte"')).disks[0].capacity_bytes == 1
    assert [ovf.units_shift(u, 0) for u in ("byte", "byte * 2^20", "MegaBytes", None)] == [0, 20, 20, 0]
    assert ovf.parse(descriptor().replace('<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>',
                                          '<vmw:BootOrderSection vmw:firmware="efi"/>')).firmware == "uefi"


@pytest.mark.parametrize("text", [
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Envelope>&e;</Envelope>',
    '<!DOCTYPE Envelope><Envelope/>', "not xml at all", "<Other/>",
    descriptor(disks=0), descriptor(macs=("zz:50:56:aa:bb:01",)),
    descriptor().replace("ovf:/disk/vmdisk0", "ovf:/disk/missing"),
    descriptor().replace('ovf:href="disk0.vmdk"', 'ovf:href="../../etc/shadow"'),
    descriptor(memory='<rasd:AllocationUnits>furlongs</rasd:AllocationUnits><rasd:VirtualQuantity>1'
                      '</rasd:VirtualQuantity>')])
def test_bad_ovf_descriptors_are_refused(text: str) -> None:
    with pytest.raises(InvalidInputError):
        ovf.parse(text)


# -- OVA packages -------------------------------------------------------------------------------------------
def _ova(path: Path, members: dict[str, bytes], manifest: bool = True, extra: list[tarfile.TarInfo] = ()) -> Path:
    files = dict(members)
    if manifest:
        files["vm.mf"] = "".join(f"SHA256({n})= {hashlib.sha256(b).hexdigest()}\n" for n, b in members.items()).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def test_an_ova_is_extracted_verified_and_closed(ctx: HostContext, ds: Path) -> None:
    ova = _ova(ds / "import" / "vm.ova", {"vm.ovf": descriptor().encode(), "disk0.vmdk": b"v" * 1024})
    pkg = ovfpkg.open_package(ctx, OvfOpen(file=str(ova), datastore="ds1"), [])
    assert pkg.manifest == {"vm.ovf": "SHA256", "disk0.vmdk": "SHA256"}
    assert ovf.parse(pkg.descriptor).disks[0].file == "disk0.vmdk"
    work = Path(pkg.workdir or "")
    assert work.parent == ds / "import" and (work / "disk0.vmdk").read_bytes() == b"v" * 1024
    with pytest.raises(InvalidInputError):
        ovfpkg.close_package(ctx, OvfClose(workdir=str(ds / "import"), datastore="ds1"))
    assert ovfpkg.close_package(ctx, OvfClose(workdir=str(work), datastore="ds1")) and not work.exists()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("extra", [_member("../evil"), _member("/abs"), _member("sub/x"),
                                   _member("l", tarfile.SYMTYPE, "/etc/passwd"), _member("h", tarfile.LNKTYPE, "vm.ovf"),
                                   _member("d", tarfile.DIRTYPE), _member("c", tarfile.CHRTYPE)])
def test_unsafe_ova_members_refuse_the_package(ctx: HostContext, ds: Path, extra: tarfile.TarInfo) -> None:
    ova = _ova(ds / "import" / "vm.ova", {"vm.ovf": descriptor().encode()}, extra=[extra])
    with pytest.raises(InvalidInputError):
        ovfpkg.open_package(ctx, OvfOpen(file=str(ova), datastore="ds1"), [])
    assert sorted(p.name for p in (ds / "import").iterdir()) == ["vm.ova"]      # no extraction folder stays


def test_a_manifest_mismatch_or_gap_refuses_the_package(ctx: HostContext, ds: Path) -> None:
    members = {"vm.ovf": descriptor().encode(), "disk0.vmdk": b"v" * 1024}
    ova = _ova(ds / "import" / "vm.ova", members)
    with tarfile.open(ova) as tar:
        mf = tar.extractfile("vm.mf").read()                                   # type: ignore[union-attr]
    bad = _ova(ds / "import" / "bad.ova", members | {"disk0.vmdk": b"w" * 1024}, manifest=False)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("vm.mf")
        info.size = len(mf)
        tar.addfile(info, io.BytesIO(mf))
    with pytest.raises(InvalidInputError) as err:
        ovfpkg.open_package(ctx, OvfOpen(file=str(bad), datastore="ds1"), [])
    assert err.value.details == {"file": "disk0.vmdk", "algorithm": "SHA256"}
    (ds / "import" / "vm.mf").write_text("SHA1(gone.vmdk)= 00\n")
    (ds / "import" / "vm.ovf").write_text(descriptor())
    with pytest.raises(InvalidInputError):
        ovfpkg.open_package(ctx, OvfOpen(file=str(ds / "import" / "vm.ovf"), datastore="ds1"), [])
    assert sorted(p.name for p in (ds / "import").iterdir()) == ["bad.ova", "vm.mf", "vm.ova", "vm.ovf"]


def test_a_plain_ovf_is_read_in_place(ctx: HostContext, ds: Path) -> None:
    (ds / "import" / "vm.ovf").write_text(descriptor())
    (ds / "import" / "disk0.vmdk").write_bytes(b"v")
    pkg = ovfpkg.open_package(ctx, OvfOpen(file=str(ds / "import" / "vm.ovf"), datastore="ds1"), [])
    assert (pkg.workdir, pkg.folder, pkg.manifest) == (None, str(ds / "import"), {})
    assert "disk0.vmdk" in pkg.files


# -- the controller's records ---------------------------------------------------------------------------------
@pytest.fixture()
def sessions(db_url: str):
    return make_sessionmaker(make_engine(db_url))


def _result(ds: str = "shared") -> AgentImageResult:
    return AgentImageResult(datastore=ds, path="images/deb.qcow2", source_format="vmdk", virtual_bytes=MIB,
                            file_bytes=MIB, sha256="a" * 64)


def _vm(sessions, name: str, **spec: object) -> None:
    s = VMSpec.model_validate({"uuid": f"u-{name}", "name": name, "boot_datastore": "shared", "folder": name} | spec)
    with sessions.begin() as db:
        if db.get(Host, "h1") is None:
            db.add(Host(name="h1", address="http://198.18.0.11:8770"))
        db.add(VM(uuid=s.uuid, name=name, host="h1", spec_json=s.model_dump_json()))


def test_a_name_is_reserved_once_and_released(sessions) -> None:
    imagestore.reserve(sessions, "deb", "shared")
    with pytest.raises(ConflictError):
        imagestore.reserve(sessions, "deb", "shared")
    assert imagestore.get_image(sessions, "deb").state == "importing"
    with pytest.raises(ConflictError):                                     # not usable until imported
        imagestore.source_for(sessions, "deb", "full", "h1", ["shared"], None)
    imagestore.forget(sessions, "deb")
    with pytest.raises(NotFoundError):
        imagestore.get_image(sessions, "deb")


def test_which_vms_use_an_image(sessions) -> None:
    imagestore.reserve(sessions, "deb", "shared")
    out = imagestore.complete(sessions, "deb", _result())
    assert (out.state, out.source_format, [c.datastore for c in out.copies], out.used_by) == (
        "ready", "vmdk", ["shared"], [])
    _vm(sessions, "full1", source_image="deb")
    _vm(sessions, "linked1", disks=[DiskSpec(datastore="shared", path="linked1/l.qcow2", backing="images/deb.qcow2",
                                             backing_format="qcow2")])
    _vm(sessions, "other", disks=[DiskSpec(datastore="h1-local", path="o/o.qcow2", backing="images/deb.qcow2")])
    assert imagestore.get_image(sessions, "deb").used_by == ["full1", "linked1"]


def test_the_copy_a_new_vm_is_made_from(sessions) -> None:
    imagestore.reserve(sessions, "deb", "shared")
    imagestore.complete(sessions, "deb", _result())
    src = imagestore.source_for(sessions, "deb", "full", "h1", ["h1-local", "shared"], "h1-local")
    assert (src.datastore, src.path, src.clone) == ("shared", "images/deb.qcow2", "full")
    assert imagestore.source_for(sessions, "deb", "linked", "h1", ["shared"], None).datastore == "shared"
    with pytest.raises(InvalidInputError) as err:
        imagestore.source_for(sessions, "deb", "linked", "h1", ["h1-local", "shared"], "h1-local")
    assert "--clone full" in err.value.remedy
    with pytest.raises(InvalidInputError) as err:
        imagestore.source_for(sessions, "deb", "full", "h2", ["h2-local"], None)
    assert err.value.details["datastores"] == ["shared"]


def test_an_import_request_needs_an_absolute_host_path() -> None:
    from pydantic import ValidationError
    from kvmotion.models.images import ImageImport

    assert ImageImport(name="a", file="/srv/x.vmdk", datastore="shared").file == "/srv/x.vmdk"
    for bad in ("x.vmdk", "/a\nb", "/" + "a" * 5000):
        with pytest.raises(ValidationError) as err:
            ImageImport(name="a", file=bad, datastore="shared")
        assert "file" in str(err.value)


def test_vm_create_takes_a_library_name_or_a_datastore_path() -> None:
    lib = VMCreate(name="v", host="h1", image="debian-12", clone="linked")
    assert (lib.library_image, lib.image_source(), lib.boot_mode) == ("debian-12", None, "disk")
    path = VMCreate(name="v", host="h1", image="shared:images/x.qcow2")
    assert path.library_image is None and path.image_source() is not None
    for bad in ("-x", "a b", "ds:../x"):
        with pytest.raises(ValueError):
            VMCreate(name="v", host="h1", image=bad)


# -- the CLI ------------------------------------------------------------------------------------------------
def test_the_product_image_group_and_the_labs_image_build_coexist() -> None:
    from kvmotion.cli.main import build_app

    for _ in range(2):                    # building the app again gives the same group, nothing doubled
        app = build_app()
        assert [g.name for g in app.registered_groups].count("image") == 1
        for args in (["image", "build", "--help"], ["image", "import", "--help"], ["vm", "import-ovf", "--help"]):
            out = CliRunner().invoke(app, args)
            assert out.exit_code == 0, out.output
        listing = CliRunner().invoke(app, ["image", "--help"]).output
        assert all(c in listing for c in ("import", "list", "show", "delete", "build"))


def test_a_vmdk_whose_extent_leaves_its_folder_is_refused_for_vm_create_too(ctx: HostContext, ds: Path) -> None:
    from kvmotion.agent import diskimage
    from kvmotion.models.boot import ImageSource

    _bad("vmdk-extent-outside", ds / "import")
    with pytest.raises(InvalidInputError) as err:
        diskimage.source_image(ctx, ImageSource(datastore="ds1", path="import/bad-vmdk-extent-outside"))
    assert "extent" in err.value.message


# -- the controller's import task, with a fake agent --------------------------------------------------------------
class FakeAgent:
    """Answers like an agent: a job that runs for two polls, then succeeds or fails."""

    def __init__(self, fail: dict | None = None) -> None:
        self.fail, self.polls, self.removed = fail, 0, []

    async def image_import(self, req: AgentImageImport) -> AgentImportStatus:
        if req.file.endswith(".txt"):
            raise InvalidInputError("notes.txt is no disk image", remedy="give a disk image")
        return AgentImportStatus(job="j1", name=req.name, percent=10.0)

    async def image_import_status(self, job: str) -> AgentImportStatus:
        self.polls += 1
        if self.polls < 2:
            return AgentImportStatus(job=job, name="deb", phase="convert", percent=60.0)
        if self.fail:
            return AgentImportStatus(job=job, name="deb", state="error", error=self.fail)
        return AgentImportStatus(job=job, name="deb", state="success", percent=100.0, result=_result())

    async def image_remove(self, datastore: str, name: str) -> bool:
        self.removed.append((datastore, name))
        return True


@pytest.fixture()
def library(sessions, monkeypatch: pytest.MonkeyPatch):
    from kvmotion.controller import images
    from kvmotion.controller.db import Datastore, HostDatastore
    from kvmotion.controller.inventory import Inventory

    monkeypatch.setattr(images, "POLL_S", 0.01)
    with sessions.begin() as db:
        db.add(Host(name="h1", address="http://198.18.0.11:8770", state="connected"))
        db.add(Datastore(uuid="ds-uuid", name="shared", shared=1))
        db.add(HostDatastore(host="h1", datastore="ds-uuid", path="/srv/ds/shared"))
    return images.ImageLibrary(sessions, Inventory(sessions))


def _run_import(library, agent: FakeAgent, file: str = "/srv/ds/shared/import/deb.vmdk"):
    from kvmotion.controller.tasks import get_task
    from kvmotion.models.images import ImageImport

    library.inventory.agent = lambda host: agent

    async def flow():
        task = await library.import_image(ImageImport(name="deb", file=file, datastore="shared"))
        assert task.kind == "image-import" and task.vm_name == "deb"
        try:
            await library.wait(task.id)
        except Exception:  # noqa: BLE001 - the task records it
            pass
        return get_task(library.sessions, task.id)
    return asyncio.run(flow())


def test_an_import_runs_as_a_task_with_phases_and_records_the_image(library) -> None:
    task = _run_import(library, FakeAgent())
    assert (task.state, task.progress, [p.name for p in task.phases]) == ("success", 100.0, ["convert"])
    assert task.result["sha256"] == "a" * 64
    assert library.get_image("deb").state == "ready"


def test_a_failed_import_releases_its_name(library) -> None:
    task = _run_import(library, FakeAgent(fail={"code": "INVALID_INPUT", "message": "corrupt", "remedy": "again"}))
    assert (task.state, task.error["code"], task.error["remedy"]) == ("error", "INVALID_INPUT", "again")
    with pytest.raises(NotFoundError):
        library.get_image("deb")
    library.inventory.agent = lambda host: FakeAgent()
    from kvmotion.models.images import ImageImport
    with pytest.raises(InvalidInputError):                 # refused by the request: no task, no record
        asyncio.run(library.import_image(ImageImport(name="deb", file="/srv/ds/shared/import/n.txt",
                                                     datastore="shared")))
    assert library.list_images() == []
    with pytest.raises(NotFoundError):
        asyncio.run(library.import_image(ImageImport(name="deb", file="/x/y", datastore="nowhere")))


def test_delete_is_refused_while_a_vm_uses_the_image_then_removes_every_copy(library) -> None:
    agent = FakeAgent()
    _run_import(library, agent)
    _vm(library.sessions, "web1", source_image="deb")
    with pytest.raises(ConflictError) as err:
        asyncio.run(library.delete_image("deb"))
    assert err.value.details["vms"] == ["web1"] and agent.removed == []
    with library.sessions.begin() as db:
        db.query(VM).delete()
    asyncio.run(library.delete_image("deb"))
    assert agent.removed == [("shared", "deb")] and library.list_images() == []


def test_imports_left_running_by_a_restart_end_in_error(library) -> None:
    from kvmotion.controller.tasks import TaskJournal, get_task

    imagestore.reserve(library.sessions, "deb", "shared")
    journal = TaskJournal.create(library.sessions, "image-import", "", "deb", "h1", "shared", {})
    library.abandon_unfinished()
    assert get_task(library.sessions, journal.id).state == "error"
    assert library.list_images() == []


def test_the_cli_shows_an_imports_phase_and_percent() -> None:
    from kvmotion.cli.progress import describe

    text = describe({"state": "running", "phase": "convert", "kind": "image-import", "live": {"percent": 42.4}})
    assert "convert" in text and "42%" in text


def test_a_restarted_agent_removes_only_its_own_leftovers(ctx: HostContext, ds: Path) -> None:
    images = ds / "images"
    images.mkdir()
    mine, theirs = images / ".deb.importing-h1-0a1b", images / ".deb.importing-h2-0a1b"
    for p in (mine, theirs, images / "deb.qcow2"):
        p.write_bytes(b"x")
    (ds / "import" / ".ova-h1-00ff").mkdir()
    (ds / "import" / ".ova-h2-00ff").mkdir()
    assert sorted(p.name for p in imagelib.remove_leftovers(ctx)) == [".deb.importing-h1-0a1b", ".ova-h1-00ff"]
    assert sorted(p.name for p in images.iterdir()) == [".deb.importing-h2-0a1b", "deb.qcow2"]
    assert [p.name for p in (ds / "import").iterdir()] == [".ova-h2-00ff"]
