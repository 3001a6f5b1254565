"""The image library in the lab with real QEMU: a user's own files imported, listed, used and deleted, and a VM
brought in from VMware's format.

- `image import` of a raw and a vdi file (through the CLI), `image list` / `image show`, VMs made from library
  images (a linked and a full clone), `image delete` refused while a VM uses the image and done after; bad input
  (a text file, a truncated qcow2, a path outside the import folder, a taken name, an unknown datastore) refused
  with the fix and nothing left behind; each import is a task (phases convert, check, checksum, with percent);
- the Debian 12 guest (``debian_image``) converted to a streamOptimized vmdk, packed into an OVA with an OVF
  descriptor (UEFI, 1 vCPU, 512 MiB, a VMware MAC) and a SHA256 manifest, imported with `vm import-ovf`, powered on:
  it boots from its disk and answers over HTTP from the client namespace.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import scenario
from labtools import http_beat, record_figure

OVA_MAC = "00:50:56:3f:00:17"


def ds_path(lab, name: str) -> Path:
    return Path(lab.root) / "ds" / name


def cli(lab, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMOTION_URL=lab.controller_url, COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "kvmotion.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def qemu_img(*args: str, timeout: float = 300) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=timeout)


def library_files(lab) -> list[str]:
    """What the shared datastore's images/ folder holds, temporary files included."""
    folder = ds_path(lab, "shared") / "images"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def refused(fn, code: str) -> KvmotionError:
    with pytest.raises(KvmotionError) as err:
        fn()
    assert err.value.code == code, err.value.to_dict()
    assert err.value.remedy
    return err.value


def test_import_list_show_use_delete_and_bad_input(lab) -> None:
    client = Client(lab.controller_url, timeout=600)
    imp = ds_path(lab, "shared") / "import"
    imp.mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "raw", str(imp / "small.raw"), "16M")
    qemu_img("convert", "-f", "raw", "-O", "vdi", str(imp / "small.raw"), str(imp / "small.vdi"))
    before = library_files(lab)
    for name, file in (("small-raw", "small.raw"), ("small-vdi", "small.vdi")):
        out = cli(lab, "image", "import", name, str(imp / file), "--datastore", "shared")
        assert out.returncode == 0, out.stdout + out.stderr
    imports = [t for t in client.tasks() if t["kind"] == "image-import"]
    assert [(t["vm_name"], t["state"], t["progress"]) for t in imports] == [
        ("small-vdi", "success", 100.0), ("small-raw", "success", 100.0)]
    assert imports[0]["result"]["source_format"] == "vdi"
    listing = cli(lab, "image", "list")
    assert "small-raw" in listing.stdout and "small-vdi" in listing.stdout, listing.stdout
    shown = json.loads(cli(lab, "image", "show", "small-vdi").stdout)
    stored = ds_path(lab, "shared") / "images" / "small-vdi.qcow2"
    assert (shown["state"], shown["source_format"], shown["format"], shown["virtual_bytes"]) == (
        "ready", "vdi", "qcow2", 16 << 20)
    assert shown["copies"] == [{"datastore": "shared", "path": "images/small-vdi.qcow2"}]
    assert shown["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()

    client.create_vm(name="lib-linked", host="h1", image="small-vdi", clone="linked")
    client.create_vm(name="lib-full", host="h1", image="small-raw", datastore="h1-local")   # reads shared's copy
    assert client.vm("lib-full")["spec"]["source_image"] == "small-raw"
    assert client.vm("lib-linked")["spec"]["disks"][0]["backing"] == "images/small-vdi.qcow2"
    for image, vm in (("small-vdi", "lib-linked"), ("small-raw", "lib-full")):
        err = refused(lambda: client.delete_image(image), "CONFLICT")
        assert err.details["vms"] == [vm]
        out = cli(lab, "image", "delete", image)
        assert out.returncode == 2 and "fix:" in out.stderr, out.stderr
        client.delete_vm(vm)
        client.delete_image(image)
    assert library_files(lab) == before
    bad_input_leaves_nothing(lab, client, imp)


def bad_input_leaves_nothing(lab, client: Client, imp: Path) -> None:
    before = library_files(lab)
    (imp / "notes.txt").write_text("a text file, not a disk image\n" * 50)
    (imp / "rand.raw").write_bytes(os.urandom(4 << 20))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(imp / "rand.raw"), str(imp / "cut.qcow2"))
    with open(imp / "cut.qcow2", "r+b") as fh:           # a qcow2 cut short: its clusters lie past the end
        fh.truncate((imp / "cut.qcow2").stat().st_size // 2)
    for file in ("notes.txt", "cut.qcow2"):
        out = cli(lab, "image", "import", "bad", str(imp / file), "--datastore", "shared")
        assert out.returncode == 2 and "fix:" in out.stderr, out.stdout + out.stderr
    outside = ds_path(lab, "shared") / "elsewhere.raw"
    qemu_img("create", "-q", "-f", "raw", str(outside), "1M")
    refused(lambda: client.import_image("bad", str(outside), "shared"), "INVALID_INPUT")
    refused(lambda: client.import_image("bad", str(imp / "small.raw"), "nowhere"), "NOT_FOUND")
    task = client.import_image("taken", str(imp / "small.raw"), "shared")
    refused(lambda: client.import_image("taken", str(imp / "small.vdi"), "shared"), "CONFLICT")   # even meanwhile
    assert scenario.follow_task(client, task["id"], timeout_s=300)["state"] == "success"
    client.delete_image("taken")
    outside.unlink()
    assert library_files(lab) == before
    assert [i["name"] for i in client.images()] == []
    for p in imp.iterdir():
        p.unlink()


def ovf_descriptor(disk: str, disk_bytes: int, capacity: int) -> str:
    return f'''<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:href="{disk}" ovf:id="file1" ovf:size="{disk_bytes}"/></References>
  <DiskSection><Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <NetworkSection><Info>The list of logical networks</Info>
    <Network ovf:name="VM Network"><Description>The VM Network network</Description></Network></NetworkSection>
  <VirtualSystem ovf:id="debian-from-vsphere">
    <Info>A virtual machine</Info><Name>debian-from-vsphere</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest"><Info>OS</Info></OperatingSystemSection>
    <VirtualHardwareSection><Info>Virtual hardware requirements</Info>
      <System><vssd:ElementName>Virtual Hardware Family</vssd:ElementName><vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType></System>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>1 virtual CPU(s)
        </rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>512MB of memory
        </rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>8</rasd:InstanceID>
        <rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>{OVA_MAC}</rasd:Address><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>10</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
'''


def make_ova(image: Path, folder: Path) -> Path:
    """The Debian guest as VMware exports a VM: OVF first, then the streamOptimized vmdk, then the manifest."""
    work = folder / "ova-build"
    work.mkdir()
    vmdk = work / "debian-disk1.vmdk"
    qemu_img("convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized", str(image), str(vmdk))
    capacity = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)], capture_output=True,
                                             text=True, check=True, timeout=60).stdout)["virtual-size"])
    ovf = work / "debian.ovf"
    ovf.write_text(ovf_descriptor(vmdk.name, vmdk.stat().st_size, capacity))
    mf = work / "debian.mf"
    mf.write_text("".join(f"SHA256({p.name})= {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in (ovf, vmdk)))
    ova = folder / "debian.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for p in (ovf, vmdk, mf):
            tar.add(p, arcname=p.name)
    for p in (ovf, vmdk, mf):
        p.unlink()
    work.rmdir()
    return ova


def test_a_debian_vm_from_an_ova_boots_from_its_vmdk_and_answers(lab, debian_image) -> None:
    client = Client(lab.controller_url, timeout=900)
    imp = ds_path(lab, "shared") / "import"
    imp.mkdir(exist_ok=True)
    ova = make_ova(debian_image.disk, imp)
    t0 = time.monotonic()
    out = cli(lab, "vm", "import-ovf", str(ova), "--host", "h1", "--datastore", "shared", "--name", "deb-ova",
              timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    record_figure("ova_import_s", time.monotonic() - t0, "s")
    spec = client.vm("deb-ova")["spec"]
    assert (spec["vcpus"], spec["memory_mb"], spec["firmware"], spec["boot"]) == (1, 512, "uefi", "disk")
    assert [n["mac"] for n in spec["nics"]] == [OVA_MAC]
    assert spec["source_image"] == "deb-ova-disk0" and spec["disks"][0]["backing"] is None
    image = client.image("deb-ova-disk0")
    assert (image["source_format"], image["used_by"]) == ("vmdk", ["deb-ova"])
    assert sorted(p.name for p in imp.iterdir()) == ["debian.ova"]          # the OVA's extraction folder is gone
    assert client.vm("deb-ova")["power_state"] == "poweredOff"

    t0 = time.monotonic()
    client.start_vm("deb-ova")
    beat = http_beat(lab, client, "deb-ova", timeout=300)
    record_figure("ova_debian_boot_to_http_s", time.monotonic() - t0, "s")
    assert beat.get("boot_id"), beat
    assert (ds_path(lab, "shared") / "deb-ova" / "nvram.fd").is_file()
    client.stop_vm("deb-ova")

    # the same imported image under BIOS: a linked clone of the library image, booting its disk with SeaBIOS
    client.create_vm(name="deb-imp-bios", host="h1", memory_mb=512, image="deb-ova-disk0", clone="linked",
                     firmware="bios")
    client.start_vm("deb-imp-bios")
    assert http_beat(lab, client, "deb-imp-bios", timeout=300).get("boot_id")
    assert not (ds_path(lab, "shared") / "deb-imp-bios" / "nvram.fd").exists()
    client.stop_vm("deb-imp-bios")
    client.delete_vm("deb-imp-bios")

    refused(lambda: client.delete_image("deb-ova-disk0"), "CONFLICT")
    client.delete_vm("deb-ova")
    client.delete_image("deb-ova-disk0")
    ova.unlink()
