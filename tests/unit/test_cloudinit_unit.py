"""cloud-init (NoCloud): each bad input file refused with its file, line and fix; the seed's files; the seed ISO read
back (volume label and files, with isoinfo); the seed moving with the VM folder; the media rule of the checker
(an ISO on a datastore the destination sees moves with the VM, a host-local one blocks)."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kvmotion.agent import seediso
from kvmotion.agent.context import HostContext
from kvmotion.cli.cloudinit import cloud_init_request, read_text
from kvmotion.common.errors import CloudInitInvalid, InvalidInputError, NotFoundError
from kvmotion.controller.cloudinit import key_problem, seed_files
from kvmotion.models.agent import CdromSpec, DiskSpec, NicSpec, VMSpec
from kvmotion.models.api import VMCreate
from kvmotion.models.cloudinit import (MAX_USER_DATA_BYTES, CloudInitFile, CloudInitRequest, SeedFiles,
                                       moves_with_folder, seed_cdrom)

# a real ed25519 public key blob (type string, then 32 bytes)
_BLOB = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))
KEY = "ssh-ed25519 " + base64.b64encode(_BLOB).decode() + " alice@desk"
UUID = "6b1f3c0e-9f5a-4d4e-8a55-1c2b3d4e5f60"
needs_iso_tools = pytest.mark.skipif(not (shutil.which("genisoimage") and shutil.which("isoinfo")),
                                     reason="genisoimage/isoinfo missing: run scripts/install.sh")


def f(text: str, name: str = "user-data.yaml") -> CloudInitFile:
    return CloudInitFile(name=name, text=text)


def req(user: str = "#cloud-config\nhostname: web1\n", **files: str) -> CloudInitRequest:
    return CloudInitRequest(user_data=f(user), **{k: f(v, k) for k, v in files.items()})


def refused(r: CloudInitRequest) -> CloudInitInvalid:
    with pytest.raises(CloudInitInvalid) as exc:
        seed_files(r, UUID, "web1")
    assert exc.value.http_status == 422 and exc.value.remedy
    return exc.value


# -- the inputs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, words", [
    ("hostname: web1\n", 1, "not '#cloud-config' or '#!'"),
    ("#cloud-config\nhostname: [web1\n", 3, "not valid YAML"),
    ("#cloud-config\nusers:\n  - name: bob\n   shell: /bin/sh\n", 4, "not valid YAML"),
    ("#cloud-config\n- hostname\n", 2, "not a mapping"),
    ("#cloud-config\nhostname: web1\nusers: bob\n", 3, "'users' is a str, not a list"),
    ("#cloud-config\nruncmd: reboot\n", 2, "'runcmd' is a str"),
    ("", 1, "not '#cloud-config'"),
])
def test_bad_user_data_names_the_file_and_line(text: str, line: int, words: str) -> None:
    err = refused(req(text))
    assert words in err.message and f"line {line}" in err.message, err.message
    assert err.details == {"file": "user-data.yaml", "kind": "user-data", "line": line}
    assert "user-data.yaml" in err.message


def test_yaml_that_parses_but_cannot_be_built_is_a_clear_error_not_a_500() -> None:
    assert "cannot read (month must be in 1..12)" in refused(req("#cloud-config\nexpires: 2024-13-45\n")).message
    assert "nests too deeply" in refused(req("#cloud-config\n" + "[" * 30000)).message


def test_user_data_size_and_text_limits() -> None:
    assert "KiB" in refused(req("#cloud-config\n#" + "é" * (MAX_USER_DATA_BYTES // 2))).message   # bytes, not chars
    assert "NUL" in refused(req("#cloud-config\nhostname: a\x00b\n")).message
    with pytest.raises(ValidationError):        # the API model bounds it too
        CloudInitFile(name="u", text="x" * (MAX_USER_DATA_BYTES + 1))


@pytest.mark.parametrize("text, words", [
    ("version: 3\nethernets: {}\n", "version 3, not 1 or 2"),
    ("ethernets: {}\n", "version None"),
    ("version: 1\n", "without a 'config:' list"),
    ("version: 2\nethernet:\n  eth0: {dhcp4: true}\n", "unknown version 2 key 'ethernet'"),
    ("- version: 2\n", "not a YAML mapping"),
    ("version: 2\nethernets:\n  eth0:\n   dhcp4: true\n  eth1: [\n", "not valid YAML"),
])
def test_bad_network_config(text: str, words: str) -> None:
    err = refused(req(network_config=text))
    assert words in err.message and err.details["kind"] == "network-config", err.message


def test_good_network_configs_are_kept_as_they_are() -> None:
    for text in ("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
                 "network:\n  version: 2\n  ethernets: {eth0: {dhcp4: true}}\n",
                 "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets: [{type: dhcp}]\n"):
        assert seed_files(req(network_config=text), UUID, "web1").network_config == text


@pytest.mark.parametrize("text, line, words", [
    ("ssh-ed25519 AAAA!!!! bob\n", 1, "not base64"),
    ("\n# mine\nssh-rsa " + base64.b64encode(_BLOB).decode() + "\n", 3, "not a ssh-rsa key"),
    ("ssh-foo AAAA bob\n", 1, "not a key type"),
    (KEY + "\nnot-a-key\n", 2, "not a key type"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", 1, "private key"),
])
def test_bad_ssh_keys_name_the_line(text: str, line: int, words: str) -> None:
    err = refused(req(ssh_key=text))
    assert words in err.message and err.details == {"file": "ssh_key", "kind": "ssh-key", "line": line}, err.message


def test_an_empty_key_file_and_a_script_with_keys_are_refused() -> None:
    assert "no public key" in refused(req(ssh_key="\n# nothing\n")).message
    err = refused(req("#!/bin/sh\necho hi\n", ssh_key=KEY))
    assert "script" in err.message and "#cloud-config" in err.remedy


@pytest.mark.parametrize("text, words", [
    ("- a\n", "not a YAML mapping"),
    ("local-hostname: 'web 1'\n", "'local-hostname' is 'web 1'"),
    ("instance-id: [1]\n", "'instance-id'"),
    ("local-hostname: {a\n", "not valid YAML"),
])
def test_bad_meta_data(text: str, words: str) -> None:
    assert words in refused(req(meta_data=text)).message


def test_keys_join_the_cloud_config_and_the_users_text_is_kept() -> None:
    user = "#cloud-config\n# my comment\nhostname: web1\npreserve_hostname: false"
    seed = seed_files(req(user, ssh_key=f"# laptop\n{KEY}\n\n"), UUID, "web1")
    assert seed.user_data.startswith(user + "\n") and "# my comment" in seed.user_data
    assert yaml.safe_load(seed.user_data)["ssh_authorized_keys"] == [KEY]
    both = seed_files(req("#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA old]\n", ssh_key=KEY), UUID, "web1")
    assert both.user_data.startswith("#cloud-config\n")
    assert yaml.safe_load(both.user_data)["ssh_authorized_keys"] == ["ssh-ed25519 AAAA old", KEY]
    assert key_problem(KEY) is None


def test_meta_data_defaults_to_the_vm_and_can_be_overridden() -> None:
    seed = seed_files(req(), UUID, "web1")
    assert yaml.safe_load(seed.meta_data) == {"instance-id": UUID, "local-hostname": "web1"}
    assert seed.network_config is None
    own = seed_files(req(meta_data="local-hostname: www\nplacement: rack1\n"), UUID, "web1")
    assert yaml.safe_load(own.meta_data) == {"instance-id": UUID, "local-hostname": "www", "placement": "rack1"}
    assert seed_files(req("#!/bin/sh\nhostname x\n"), UUID, "web1").user_data == "#!/bin/sh\nhostname x\n"


def test_the_create_request_takes_the_files_and_nothing_else() -> None:
    body = {"name": "web1", "host": "h1", "cloud_init": {"user_data": {"name": "u", "text": "#cloud-config\n"}}}
    assert VMCreate.model_validate(body).cloud_init is not None
    with pytest.raises(ValidationError):
        VMCreate.model_validate(body | {"cloud_init": {"user_data": {"name": "u", "text": ""}, "vendor_data": {}}})
    with pytest.raises(ValidationError):
        VMCreate.model_validate(body | {"cloud_init": {"user_data": {"name": "", "text": ""}}})


# -- the CLI reads the files ---------------------------------------------------------------------------------------------

def test_the_cli_reads_files_with_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "u.yaml").write_text("#cloud-config\n")
    (tmp_path / "big").write_bytes(b"#" * (20 << 10))
    (tmp_path / "latin1").write_bytes(b"#cloud-config\nname: caf\xe9\n")
    assert read_text(tmp_path / "u.yaml", "user-data", 100) == {"name": "u.yaml", "text": "#cloud-config\n"}
    for path, words in ((tmp_path / "missing.yaml", "cannot be read"), (tmp_path / "big", "larger than 16 KiB"),
                        (tmp_path / "latin1", "line 2 is not UTF-8")):
        with pytest.raises(CloudInitInvalid, match=words):
            read_text(path, "meta-data", 16 << 10)
    assert cloud_init_request(None, None, None, None) is None
    only_key = cloud_init_request(None, None, tmp_path / "u.yaml", None)
    assert only_key is not None and only_key["user_data"]["text"] == "#cloud-config\n"
    assert only_key["network_config"]["name"] == "u.yaml"


# -- the seed ISO ---------------------------------------------------------------------------------------------------------

def _ctx(tmp_path: Path) -> HostContext:
    stores = {ds: tmp_path / ds for ds in ("shared", "h1-local")}
    for p in stores.values():
        p.mkdir()
    return HostContext("h1", "tcg", stores, {})


def _vm(folder: str = "web1", **kw: object) -> VMSpec:
    return VMSpec.model_validate({"uuid": UUID, "name": "web1", "boot_datastore": "shared", "folder": folder,
                                  "boot": "disk", "cdroms": [seed_cdrom(folder).model_dump()]} | kw)


def _isoinfo(iso: Path, *args: str) -> str:
    return subprocess.run(["isoinfo", "-i", str(iso), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


@needs_iso_tools
def test_the_seed_iso_has_the_label_and_the_files(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    (tmp_path / "shared" / "web1").mkdir()
    seed = seed_files(req(ssh_key=KEY, network_config="version: 2\nethernets: {}\n"), UUID, "web1")
    iso = seediso.write_seed(ctx, _vm(), seed)
    assert iso == tmp_path / "shared" / "web1" / "cidata.iso"
    assert "Volume id: cidata" in _isoinfo(iso, "-d")
    assert sorted(_isoinfo(iso, "-R", "-f").split()) == ["/meta-data", "/network-config", "/user-data"]
    assert sorted(_isoinfo(iso, "-J", "-f").split()) == ["/meta-data", "/network-config", "/user-data"]
    for name, text in (("user-data", seed.user_data), ("meta-data", seed.meta_data),
                       ("network-config", seed.network_config)):
        assert _isoinfo(iso, "-R", "-x", f"/{name}") == text
    assert [p.name for p in iso.parent.iterdir()] == ["cidata.iso"]      # no temporary file left
    with pytest.raises(Exception, match="already exists"):                 # never over an existing one
        seediso.write_seed(ctx, _vm(), seed)


def test_the_seed_is_confined_to_the_datastore(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "shared" / "escape").symlink_to(outside, target_is_directory=True)
    (tmp_path / "shared" / "web2").mkdir()
    (tmp_path / "shared" / "web2" / "cidata.iso").symlink_to(outside / "planted.iso")
    seed = SeedFiles(user_data="#cloud-config\n", meta_data="{}\n")
    with pytest.raises(InvalidInputError, match="symbolic link"):
        seediso.write_seed(ctx, _vm("escape"), seed)
    with pytest.raises(InvalidInputError, match="symbolic link"):
        seediso.write_seed(ctx, _vm("web2"), seed)
    assert list(outside.iterdir()) == []


def test_a_missing_iso_tool_is_a_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    ctx = _ctx(tmp_path)
    (tmp_path / "shared" / "web1").mkdir()
    monkeypatch.setattr(seediso.shutil, "which", lambda name: None)
    with pytest.raises(NotFoundError, match="genisoimage") as exc:
        seediso.write_seed(ctx, _vm(), SeedFiles(user_data="#cloud-config\n", meta_data="{}\n"))
    assert "install" in exc.value.remedy
    assert list((tmp_path / "shared" / "web1").iterdir()) == []


# -- the seed moves with the VM folder --------------------------------------------------------------------------------

def test_the_seed_moves_with_the_folder(tmp_path: Path) -> None:
    from kvmotion.agent.storage import AgentStorage, present_home_names
    from kvmotion.common.confined import Place

    class Storage(AgentStorage):
        def context(self) -> HostContext:
            return ctx

    ctx = _ctx(tmp_path)
    vm = _vm()
    folder = tmp_path / "shared" / "web1"
    folder.mkdir()
    where = Place.of(tmp_path / "shared", "web1")
    assert present_home_names(where, vm) == ()
    (folder / "cidata.iso").write_bytes(b"seed")
    assert present_home_names(where, vm) == ("cidata.iso",)
    files = Storage().home_files(vm)
    assert files == {"cidata.iso": base64.b64encode(b"seed").decode()}
    moved = vm.model_copy(update={"boot_datastore": "h1-local"})
    Storage().put_home(moved, files)
    assert (tmp_path / "h1-local" / "web1" / "cidata.iso").read_bytes() == b"seed"
    assert moves_with_folder(moved.cdroms[0], moved)          # it names no datastore: it is the new folder's
    with pytest.raises(InvalidInputError, match="not the ones"):
        Storage().put_home(moved.model_copy(update={"folder": "web9"}), {"other.iso": ""})


# -- the checker: shared media moves, host-local media blocks --------------------------------------------------------

def _media_codes(vm: VMSpec, dst_datastores: tuple[str, ...], target: VMSpec | None = None) -> list[str]:
    from kvmotion.checks import HostView, MigrationContext
    from kvmotion.checks.rules import media
    from kvmotion.models.agent import DatastoreFact, HostFacts
    facts = HostFacts.model_validate({
        "name": "h2", "agent_version": "0", "qemu_version": "7.2", "accelerator": "tcg", "cpu_model": "x",
        "cpu_features": [], "cpu_count": 2, "mem_total_mb": 8192, "mem_free_mb": 4096,
        "mgmt_address": "198.18.0.12", "mgmt_family": "ipv4", "portgroups": [], "migration_interfaces": [],
        "datastores": [DatastoreFact(uuid=f"id-{d}", name=d, path=f"/ds/{d}", readable=True).model_dump()
                       for d in dst_datastores]})
    ctx = MigrationContext(spec=vm, power_state="poweredOn", source=HostView("h1", "connected", False, None),
                           destination=HostView("h2", "connected", False, facts), target_spec=target)
    return [x.code for x in media(ctx)]


def _with_iso(cd: CdromSpec, **kw: object) -> VMSpec:
    return VMSpec(uuid=UUID, name="web1", boot_datastore="shared", folder="web1", cdroms=[cd],
                  disks=[DiskSpec(datastore="shared", path="web1/web1.qcow2")],
                  nics=[NicSpec(mac="52:54:00:00:00:01")], **kw)


def test_an_iso_on_a_shared_datastore_does_not_block_a_move() -> None:
    seed = _with_iso(seed_cdrom("web1"))
    assert _media_codes(seed, ("shared", "h2-local")) == []
    tools = _with_iso(CdromSpec(media="local", path="iso/tools.iso", datastore="shared"))
    assert _media_codes(tools, ("shared",)) == []


def test_a_host_local_iso_blocks_a_move() -> None:
    local = _with_iso(CdromSpec(media="local", path="iso/tools.iso", datastore="h1-local"))
    assert _media_codes(local, ("shared", "h2-local")) == ["LOCAL_MEDIA_CONNECTED"]
    seed = _with_iso(seed_cdrom("web1"))
    assert _media_codes(seed, ("h2-local",)) == ["LOCAL_MEDIA_CONNECTED"]      # the destination lacks the folder's


def test_the_seed_follows_a_moving_folder_and_other_folder_media_do_not() -> None:
    seed = _with_iso(seed_cdrom("web1"))
    to_local = seed.model_copy(update={"boot_datastore": "h2-local"})
    assert _media_codes(seed, ("h2-local",), to_local) == []                   # shared-nothing: it moves along
    own = _with_iso(CdromSpec(media="local", path="web1/tools.iso", datastore="shared"))
    codes = _media_codes(own, ("shared", "h2-local"), own.model_copy(update={"boot_datastore": "h2-local"}))
    assert codes == ["LOCAL_MEDIA_CONNECTED"]            # removed with the old folder: refused, not lost
    stays = _with_iso(CdromSpec(media="local", path="iso/tools.iso"))
    assert _media_codes(stays, ("shared", "h2-local"),
                        stays.model_copy(update={"boot_datastore": "h2-local"})) == ["LOCAL_MEDIA_CONNECTED"]


def test_no_file_is_written_by_a_refused_check(tmp_path: Path) -> None:
    """Validation is pure: nothing on disk to clean up when it refuses."""
    before = set(os.listdir(tmp_path))
    refused(req("#cloud-config\nhostname: [x\n"))
    assert set(os.listdir(tmp_path)) == before
