"""Input handling: names and bounds of the wire models. Unit tests only: no lab, no QEMU.

Datastore-relative paths and the no-shell rule are in test_paths_unit.py.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kvmotion.models.agent import (NAME_PATTERN, CdromSpec, DiskCopyRequest, DiskSpec, DiskTarget, MirrorRequest,
                                   NicSpec, StartRequest, VMSpec, relative_path_problem)
from kvmotion.models import api as schemas
from kvmotion.models.api import (CdromChange, ClusterCreate, HostAdd, MigrateRequest, VMCreate, VMUpdate)

SECRET = "0" * 64


def refused(exc: pytest.ExceptionInfo[ValidationError], field: str, words: str) -> None:
    """A validation error names the field and says what was wrong."""
    text = str(exc.value)
    assert field in text and words in text, text


# ---------------------------------------------------------------------------------------------------------------
# names: one rule, everywhere
# ---------------------------------------------------------------------------------------------------------------

GOOD_NAMES = ["bench1", "wire1", "shared", "h1-local", "h1", "c1", "Nehalem", "host-passthrough", "pc-q35-7.2",
              "a", "A_b.c-d", "x" * 63, "0start"]
BAD_NAMES = ["", "-x", ".hidden", "_x", "..", "../etc", "a/b", "a b", "a,b", "a;b", "a=b", "x" * 64, "a\x00b", "a\nb",
             "tab\t", "é", "$(id)", "`id`"]


def name_fields() -> list[tuple[type[BaseModel], str, dict[str, Any]]]:
    """(model, field, other required fields) for every controller request field that holds a name."""
    return [
        (VMCreate, "name", {"host": "h1"}), (VMCreate, "host", {"name": "vm1"}),
        (VMCreate, "datastore", {"name": "vm1", "host": "h1"}), (VMCreate, "data_datastore", {"name": "vm1", "host": "h1"}),
        (VMCreate, "cpu_model", {"name": "vm1", "host": "h1"}),
        (MigrateRequest, "host", {}), (MigrateRequest, "datastore", {}),
        (ClusterCreate, "name", {}), (ClusterCreate, "evc_mode", {"name": "c1"}),
        (HostAdd, "name", {"address": "http://198.18.0.11:8770", "secret": SECRET}),
        (CdromChange, "datastore", {"media": "local", "path": "iso/x.iso"}),
    ]


@pytest.mark.parametrize("model,field,rest", name_fields(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_names_follow_one_pattern(model: type[BaseModel], field: str, rest: dict[str, Any]) -> None:
    for good in GOOD_NAMES:
        assert getattr(model(**rest, **{field: good}), field) == good
    for bad in BAD_NAMES:
        with pytest.raises(ValidationError) as exc:
            model(**rest, **{field: bad})
        refused(exc, field, "pattern")


def _string_schemas(schema: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return [s for sub in schema["anyOf"] for s in _string_schemas(sub, defs)]
    return [schema]


def test_every_name_field_uses_the_shared_pattern() -> None:
    """No field keeps a private copy of the name rule: the JSON schema shows the one shared pattern."""
    for model, field, _ in name_fields():
        schema = model.model_json_schema()
        subs = [s for s in _string_schemas(schema["properties"][field], schema.get("$defs", {})) if s.get("type") != "null"]
        assert [s.get("pattern") for s in subs] == [NAME_PATTERN], (model.__name__, field, subs)
    spec = VMSpec.model_json_schema()
    assert spec["properties"]["name"]["pattern"] == NAME_PATTERN
    assert spec["properties"]["boot_datastore"]["pattern"] == NAME_PATTERN


def test_port_groups_may_have_inner_spaces() -> None:
    assert VMCreate(name="vm1", host="h1", network="VM Network").network == "VM Network"
    assert VMCreate(name="vm1", host="h1").network == "VM Network"
    for bad in ("", " VM", "VM ", "a,b", "a/b", "a\tb", "x" * 64):
        with pytest.raises(ValidationError) as exc:
            VMCreate(name="vm1", host="h1", network=bad)
        refused(exc, "network", "pattern")


# ---------------------------------------------------------------------------------------------------------------
# bounds: every number, string, list and dict in a request
# ---------------------------------------------------------------------------------------------------------------

def request_models() -> list[type[schemas.Request]]:
    return [c for c in vars(schemas).values()
            if isinstance(c, type) and issubclass(c, schemas.Request) and c is not schemas.Request]


def _unbounded(where: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    """Fields of a JSON schema without a bound: numbers need both limits, strings a pattern, length or enum,
    lists and dicts a size limit and bounded items and keys."""
    out: list[str] = []
    for s in _string_schemas(schema, defs):
        kind = s.get("type")
        if kind in ("integer", "number"):
            if not ({"minimum", "exclusiveMinimum"} & set(s) and {"maximum", "exclusiveMaximum"} & set(s)):
                out.append(f"{where}: number without both limits")
        elif kind == "string":
            if not ({"pattern", "maxLength", "enum", "const"} & set(s)):
                out.append(f"{where}: string without a pattern or max length")
        elif kind == "array":
            if "maxItems" not in s:
                out.append(f"{where}: list without a size limit")
            out += _unbounded(f"{where}[]", s.get("items", {}), defs)
        elif kind == "object" and "properties" in s:        # a nested model: each of its fields
            for name, sub in s["properties"].items():
                out += _unbounded(f"{where}.{name}", sub, defs)
        elif kind == "object" and "properties" not in s:
            if "maxProperties" not in s:
                out.append(f"{where}: dict without a size limit")
            if "patternProperties" in s:
                for key, value in s["patternProperties"].items():
                    out += _unbounded(f"{where}[{key}]", value, defs)
            else:
                out.append(f"{where}: dict keys without a pattern")
                out += _unbounded(f"{where}{{}}", s.get("additionalProperties", {}), defs)
        elif kind not in ("boolean", "null"):
            out.append(f"{where}: unexpected schema {s}")
    return out


@pytest.mark.parametrize("model", request_models(), ids=lambda m: m.__name__)
def test_every_request_field_is_bounded(model: type[schemas.Request]) -> None:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    problems = [p for name, prop in schema["properties"].items() for p in _unbounded(f"{model.__name__}.{name}", prop, defs)]
    assert problems == []


def test_known_request_models_are_checked() -> None:
    names = {m.__name__ for m in request_models()}
    assert {"VMCreate", "VMUpdate", "MigrateRequest", "CdromChange", "ClusterCreate", "HostAdd",
            "MaintenanceRequest"} <= names


NUMBERS = [  # model, field, other required fields, accepted values, refused values, words in the refusal
    (VMCreate, "memory_mb", {"name": "vm1", "host": "h1"}, [64, 128, 256, 2048, 60000, 65536], [63, 0, -1, 65537, 10**12],
     "memory_mb"),
    (VMCreate, "vcpus", {"name": "vm1", "host": "h1"}, [1, 2, 64], [0, -1, 65], "vcpus"),
    (VMCreate, "disk_mb", {"name": "vm1", "host": "h1"}, [1, 64, 1024 * 1024], [0, -5, 1024 * 1024 + 1], "disk_mb"),
    (VMCreate, "data_disk_mb", {"name": "vm1", "host": "h1"}, [1, 16, 128], [0, 1024 * 1024 + 1], "data_disk_mb"),
    (VMCreate, "dirty_mb_s", {"name": "vm1", "host": "h1"}, [0, 2.5, 20, 10000],
     [-0.1, 10000.5, math.inf, -math.inf, math.nan], "dirty_mb_s"),
    (VMCreate, "records_rate", {"name": "vm1", "host": "h1"}, [0, 50, 10000], [-1, 10001], "records_rate"),
    (VMCreate, "records_kb", {"name": "vm1", "host": "h1"}, [4, 1024], [3, 1025], "records_kb"),
    (MigrateRequest, "disk_mbps", {}, [1, 8, 40, 1_000_000], [0, -1, 1_000_001], "disk_mbps"),
    (MigrateRequest, "downtime_ms", {}, [10, 50, 500, 2_000_000], [9, 0, 2_000_001], "downtime_ms"),
    (MigrateRequest, "max_bandwidth_mbps", {}, [1, 40, 1_000_000], [0, 1_000_001], "max_bandwidth_mbps"),
    (MigrateRequest, "progress_timeout_s", {}, [1, 150, 7 * 86400], [0, 0.5, 7 * 86400 + 1, math.inf, math.nan],
     "progress_timeout_s"),
    (MigrateRequest, "completion_timeout_s_per_gib", {}, [1, 800], [0, math.inf, math.nan, 10**9],
     "completion_timeout_s_per_gib"),
]


@pytest.mark.parametrize("model,field,rest,good,bad,words", NUMBERS, ids=[f"{n[0].__name__}.{n[1]}" for n in NUMBERS])
def test_numbers_are_bounded(model, field, rest, good, bad, words) -> None:
    for v in good:
        assert getattr(model(**rest, **{field: v}), field) == v
    for v in bad:
        with pytest.raises(ValidationError) as exc:
            model(**rest, **{field: v})
        refused(exc, words, "Input should be")
        assert any(w in str(exc.value) for w in ("greater than", "less than", "finite number")), str(exc.value)


def test_lists_and_dicts_are_bounded() -> None:
    assert VMCreate(name="vm1", host="h1", cpu_mask=["avx2", "sse4.2", "lahf_lm"]).cpu_mask == ["avx2", "sse4.2", "lahf_lm"]
    with pytest.raises(ValidationError) as exc:
        VMCreate(name="vm1", host="h1", cpu_mask=[f"f{i}" for i in range(129)])
    refused(exc, "cpu_mask", "at most 128")
    for feature in ("avx2,enforce=off", "a b", "", "-x"):      # a feature lands in "-cpu MODEL,-FEATURE"
        with pytest.raises(ValidationError) as exc:
            VMCreate(name="vm1", host="h1", cpu_mask=[feature])
        refused(exc, "cpu_mask", "pattern")
    assert MigrateRequest(disks={"0": "shared", "disk1": "h2-local"}).disks == {"0": "shared", "disk1": "h2-local"}
    with pytest.raises(ValidationError) as exc:
        MigrateRequest(disks={str(i): "shared" for i in range(17)})
    refused(exc, "disks", "at most 16")
    for key, value in (("../0", "shared"), ("0 1", "shared"), ("", "shared"), ("0", "../x"), ("0", "a b")):
        with pytest.raises(ValidationError) as exc:
            MigrateRequest(disks={key: value})
        refused(exc, "disks", "pattern")


def test_choices_and_strings() -> None:
    for field, bad in (("encrypted_vmotion", "sometimes"), ("disk_format", "vmdk"), ("ip", "198.18.1.1/24 init=/bin/sh"),
                       ("ip", "x" * 100), ("rdm", "relative/dev"), ("rdm", "/dev/sda\x00"), ("marker", "a b")):
        with pytest.raises(ValidationError) as exc:
            VMCreate(name="vm1", host="h1", **{field: bad})
        refused(exc, field, "pattern")
    ok = VMCreate(name="vm1", host="h1", ip="198.18.1.120/24", rdm="/dev/loop3", cpu_model="host-passthrough")
    assert ok.ip == "198.18.1.120/24" and ok.rdm == "/dev/loop3"
    assert VMCreate(name="v6", host="h1", ip="fd00:1::20/64").ip == "fd00:1::20/64"
    with pytest.raises(ValidationError) as exc:
        VMUpdate(encrypted_vmotion="always")
    refused(exc, "encrypted_vmotion", "pattern")
    with pytest.raises(ValidationError) as exc:
        MigrateRequest(priority="urgent")
    refused(exc, "priority", "pattern")
    with pytest.raises(ValidationError) as exc:
        VMCreate(name="vm1", host="h1", memroy_mb=256)                     # a misspelt option is an error
    refused(exc, "memroy_mb", "Extra inputs are not permitted")


def test_host_address_is_an_agent_url() -> None:
    for good in ("http://198.18.0.11:8770", "http://[fd00::11]:8770", "https://h1.example.com:8770/"):
        assert HostAdd(address=good, secret=SECRET).address == good
    for bad in ("198.18.0.11:8770", "ftp://h1:8770", "file:///etc/passwd", "http://user@h1:8770", "http://h1:8770/x",
                "http://h 1:8770", "http://h1:8770?x=1", "http://", "http://" + "h" * 300):
        with pytest.raises(ValidationError) as exc:
            HostAdd(address=bad, secret=SECRET)
        refused(exc, "address", "address")


CDROM_BAD_PATHS = [("../etc/passwd", "'..'"), ("iso/../../etc/passwd", "'..'"), ("/etc/passwd", "is absolute"),
                   ("a\x00b", "NUL byte"), ("", "is empty"), (".", "datastore itself"), ("./", "datastore itself"),
                   ("iso/x\n.iso", "control character"), ("a" * 256, "longer than 255"), ("a/" * 600, "at most 1024")]


@pytest.mark.parametrize("path,words", CDROM_BAD_PATHS, ids=[repr(p[:20]) for p, _ in CDROM_BAD_PATHS])
def test_cdrom_path_is_datastore_relative(path: str, words: str) -> None:
    with pytest.raises(ValidationError) as exc:
        CdromChange(media="local", path=path)
    refused(exc, "path", words)


def test_cdrom_good_paths_and_nbd_addresses() -> None:
    assert CdromChange(media="local", path="iso/tools.iso").path == "iso/tools.iso"
    assert CdromChange(media="local", path="chk1/tools.iso", datastore="shared").datastore == "shared"
    for good in ("nbd://198.18.0.1:10809/tools", "nbd://[fd00::1]:10809/x", "nbd://h1/x"):
        assert CdromChange(media="client", nbd=good).nbd == good
    for bad, words in (("http://h1/x", "not an nbd://"), ("nbd://h1:99999/x", "not a valid address"),
                       ("nbd://h1:port/x", "not a valid address"), ("nbd:///x", "names no host"),
                       ("nbd://h1/x y", "space"), ('json:{"file":{"filename":"/etc/shadow"}}', "not an nbd://"),
                       ("nbd://u:p@h1/x", "user"), ("nbd://h1/" + "x" * 3000, "at most 2048")):
        with pytest.raises(ValidationError) as exc:
            CdromChange(media="client", nbd=bad)
        refused(exc, "nbd", words)


def test_relative_path_problem_accepts_plain_paths() -> None:
    for ok in ("vm1/vm1.qcow2", "vm1", "a/b/c.iso", "vm1/./vm1.raw", "x" * 255):
        assert relative_path_problem(ok) is None, ok


# -- the agent's own request models (what reaches QEMU's command line) ----------------------------------------------

def spec(**over: Any) -> VMSpec:
    base: dict[str, Any] = dict(uuid="0b9d7a44-3f43-4bde-9a51-3c1f1a1fb0c2", name="vm1", boot_datastore="ds",
                                folder="vm1", disks=[DiskSpec(datastore="ds", path="vm1/vm1.qcow2")],
                                nics=[NicSpec(mac="52:54:00:0b:9d:7a")], cdroms=[CdromSpec()])
    base.update(over)
    return VMSpec(**base)


def test_vm_spec_refuses_qemu_option_injection() -> None:
    assert spec(cpu_model="host-passthrough", cpu_mask=["avx2"], guest_ip="198.18.1.100/24").name == "vm1"
    for field, bad in (("name", "vm1,debug-threads=off"), ("name", "vm1 init=/bin/sh"), ("uuid", "../../etc"),
                       ("machine", "q35,accel=kvm"), ("cpu_model", "qemu64,+vmx"), ("cpu_mask", ["a,enforce=off"]),
                       ("guest_ip", "1.2.3.4/24 init=/bin/sh"), ("extra_cmdline", "a\nb"), ("boot_datastore", "../x"),
                       ("memory_mb", 0), ("memory_mb", 1 << 40), ("vcpus", 0), ("dirty_mb_s", math.nan),
                       ("disks", [DiskSpec(datastore="ds", path=f"d{i}") for i in range(17)]),
                       ("encrypted_vmotion", "maybe")):
        with pytest.raises(ValidationError) as exc:
            spec(**{field: bad})
        assert field in str(exc.value), (field, str(exc.value))
    for model, kwargs, field in ((NicSpec, {"mac": "52:54:00:00:00:01,x=y"}, "mac"),
                                 (NicSpec, {"mac": "52:54:00:00:00:01", "portgroup": "VM Network,x"}, "portgroup"),
                                 (DiskSpec, {"id": "disk0,x=y"}, "id"), (DiskSpec, {"node": "0d"}, "node"),
                                 (DiskSpec, {"kind": "nfs"}, "kind"), (DiskSpec, {"format": "vmdk"}, "format"),
                                 (DiskSpec, {"size_mb": -1}, "size_mb"), (CdromSpec, {"media": "floppy"}, "media"),
                                 (CdromSpec, {"id": "cd0,x"}, "id"),
                                 (DiskTarget, {"disk_id": "disk0", "nbd_port": 70000}, "nbd_port"),
                                 (DiskTarget, {"disk_id": "disk0", "kind": "iscsi"}, "kind"),
                                 (MirrorRequest, {"targets": [], "copy_mode": "fast"}, "copy_mode"),
                                 (MirrorRequest, {"targets": [], "speed_bytes": -1}, "speed_bytes"),
                                 (StartRequest, {"spec": spec(), "disk_keys": {"../x": "k"}}, "disk_keys")):
        with pytest.raises(ValidationError) as exc:
            model(**kwargs)
        assert field in str(exc.value), (model.__name__, field, str(exc.value))
    # a spec written before these rules, with an ISO outside any datastore, still loads (the agent refuses to open it)
    old = spec(cdroms=[CdromSpec(media="local", path="/srv/iso/old.iso")])
    assert VMSpec.model_validate_json(old.model_dump_json()) == old
    rdm = DiskSpec(id="disk1", node="d1", kind="rdm", format="raw", identity="loop:7:3")
    assert VMSpec.model_validate_json(spec(disks=[rdm]).model_dump_json()).disks[0].datastore == ""


def test_disk_copy_source_uri_is_nbd_only() -> None:
    """qemu-img takes "json:{...}" and file names as sources: only an nbd:// address may come in here."""
    for bad in ('json:{"file":{"driver":"file","filename":"/etc/shadow"}}', "/etc/shadow", "file:///etc/shadow",
                "nbd://h1:70000/x"):
        with pytest.raises(ValidationError) as exc:
            DiskCopyRequest(source_uri=bad, datastore="ds", path="vm1/vm1.qcow2")
        assert "source_uri" in str(exc.value)
    ok = DiskCopyRequest(source_uri="nbd://198.18.2.12:10809/abc", datastore="ds", path="vm1/vm1.qcow2")
    assert ok.source_uri == "nbd://198.18.2.12:10809/abc"
