"""An OVF descriptor (DMTF DSP0243, as VMware exports it) read into what a kvmotion VM needs.

Parsed with ``xml.etree.ElementTree`` after refusing any DOCTYPE or ENTITY declaration (no external entities, no
entity expansion). Elements are matched by local name, so OVF 1.x and 2.x namespaces both work. Mapped: the
vCPU count (rasd ResourceType 3), memory (4, with its allocation units), disks (17, through DiskSection and
References to their files, in hardware order), NICs (10: count, MAC when given) and the firmware
(``vmw:firmware="efi"`` or a ``vmw:Config firmware=efi`` → uefi, else bios).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from kvmotion.common.errors import InvalidInputError
from kvmotion.models.agent import MAC_PATTERN
from kvmotion.models.images import OvfDisk, OvfMachine, OvfNic

CPU, MEMORY, ETHERNET, DISK = "3", "4", "10", "17"
UNIT = re.compile(r"^\s*byte\s*\*\s*2\s*\^\s*(\d+)\s*$", re.IGNORECASE)
NAMED_UNITS = {"kilobytes": 10, "kb": 10, "megabytes": 20, "mb": 20, "gigabytes": 30, "gb": 30, "bytes": 0, "byte": 0}
REMEDY = "give the OVF descriptor as the exporter wrote it (DMTF OVF 1.x or 2.x)"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    """An attribute by local name, whatever its namespace."""
    return next((v for k, v in el.attrib.items() if _local(k) == name), None)


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _find_all(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el.iter() if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str:
    found = _children(el, name)
    return (found[0].text or "").strip() if found else ""


def units_shift(units: str | None, default: int) -> int:
    """The power of two of an OVF allocation unit ("byte * 2^20", "MegaBytes", …)."""
    if not units:
        return default
    m = UNIT.match(units)
    if m:
        return int(m.group(1))
    if units.strip().lower() in NAMED_UNITS:
        return NAMED_UNITS[units.strip().lower()]
    raise InvalidInputError(f"OVF allocation unit {units!r} is not understood", remedy=REMEDY)


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"OVF {what} {value[:40]!r} is not a whole number", remedy=REMEDY) from None


def parse_root(text: str) -> ET.Element:
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise InvalidInputError("the OVF descriptor declares a DOCTYPE or ENTITY, which is refused (entities could "
                                "read other files)", remedy="remove the DOCTYPE/ENTITY declarations")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidInputError(f"the OVF descriptor is not well-formed XML: {exc}", remedy=REMEDY) from exc
    if _local(root.tag) != "Envelope":
        raise InvalidInputError(f"the descriptor's root is <{_local(root.tag)}>, not an OVF <Envelope>", remedy=REMEDY)
    return root


def _disk_files(root: ET.Element) -> dict[str, OvfDisk]:
    """diskId -> its file (References) and capacity (DiskSection)."""
    hrefs = {_attr(f, "id"): _attr(f, "href") or "" for f in _find_all(root, "File")}
    disks = {}
    for d in _find_all(root, "Disk"):
        disk_id, ref = _attr(d, "diskId"), _attr(d, "fileRef")
        if not disk_id or not ref or ref not in hrefs:
            raise InvalidInputError(f"OVF disk {disk_id!r} names no file in References", remedy=REMEDY)
        shift = units_shift(_attr(d, "capacityAllocationUnits"), 0)
        disks[disk_id] = OvfDisk(file=hrefs[ref], capacity_bytes=_int(_attr(d, "capacity") or "0", "capacity") << shift)
    return disks


def _firmware(system: ET.Element) -> str:
    for el in system.iter():
        if (_attr(el, "firmware") or "").lower() == "efi":
            return "uefi"
        if _local(el.tag) == "Config" and _attr(el, "key") == "firmware" and (_attr(el, "value") or "").lower() == "efi":
            return "uefi"
    return "bios"


def _hardware(system: ET.Element, disks: dict[str, OvfDisk], out: OvfMachine) -> None:
    for item in _find_all(system, "Item"):
        kind = _text(item, "ResourceType")
        if kind == CPU:
            out.vcpus = _int(_text(item, "VirtualQuantity") or "1", "vCPU count")
        elif kind == MEMORY:
            shift = units_shift(_text(item, "AllocationUnits"), 20)
            out.memory_mb = (_int(_text(item, "VirtualQuantity"), "memory size") << shift) >> 20
        elif kind == ETHERNET:
            mac = _text(item, "Address") or None
            if mac is not None and not re.match(MAC_PATTERN, mac):
                raise InvalidInputError(f"OVF NIC MAC address {mac[:40]!r} is not xx:xx:xx:xx:xx:xx", remedy=REMEDY)
            out.nics.append(OvfNic(mac=mac.lower() if mac else None, network=_text(item, "Connection")))
        elif kind == DISK:
            ref = _text(item, "HostResource").removeprefix("ovf:").removeprefix("/disk/").lstrip("/")
            ref = ref.split("/")[-1]
            if ref not in disks:
                raise InvalidInputError(f"OVF disk item names {ref!r}, which DiskSection lacks", remedy=REMEDY)
            out.disks.append(disks[ref])


def parse(text: str) -> OvfMachine:
    """The one VirtualSystem of an OVF descriptor, mapped (refused with the reason when it cannot be)."""
    root = parse_root(text)
    systems = _find_all(root, "VirtualSystem")
    if len(systems) != 1:
        raise InvalidInputError(f"the OVF descriptor has {len(systems)} virtual systems; kvmotion imports one",
                                remedy="export each VM as its own OVF package")
    system = systems[0]
    name = _text(system, "Name") or _attr(system, "id") or "imported"
    out = OvfMachine(name=re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63].strip("-._") or "imported")
    _hardware(system, _disk_files(root), out)
    out.firmware = _firmware(system)
    if not out.disks:
        raise InvalidInputError("the OVF descriptor has no disk", remedy="export the VM with its disks")
    for d in out.disks:
        if "/" in d.file or d.file in ("", ".", ".."):
            raise InvalidInputError(f"OVF disk file {d.file!r} is not a plain file name in the package",
                                    remedy="give a package whose disks sit beside the descriptor")
    out.vcpus = max(1, min(out.vcpus, 64))
    out.memory_mb = max(64, min(out.memory_mb, 65536))
    return out
