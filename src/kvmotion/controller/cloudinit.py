"""cloud-init input checks: every file is judged before anything is created, and the seed's files are rendered.

user-data: ``#cloud-config`` YAML (a mapping) or a script starting with ``#!``; network-config: YAML, version 1
(``config:`` a list) or 2 (``ethernets:`` ...), optionally under a top-level ``network:``; meta-data: a YAML
mapping (instance-id defaults to the VM's UUID, local-hostname to its name); SSH keys: OpenSSH public key lines.
A bad file raises :class:`CloudInitInvalid` naming the file, the line and the fix.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from typing import Any

import yaml

from kvmotion.common.errors import CloudInitInvalid
from kvmotion.models.cloudinit import MAX_SMALL_FILE_BYTES, MAX_USER_DATA_BYTES, CloudInitFile, CloudInitRequest, SeedFiles

KEY_TYPES = frozenset({"ssh-rsa", "ssh-dss", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                       "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"})
V2_KEYS = frozenset({"version", "renderer", "ethernets", "bonds", "bridges", "vlans", "wifis"})
META_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})?$")


def _bad(f: CloudInitFile, kind: str, problem: str, remedy: str, line: int | None = None) -> CloudInitInvalid:
    where = f" line {line}" if line else ""
    return CloudInitInvalid(f"{kind} file {f.name!r}{where}: {problem}", remedy=remedy,
                            details={"file": f.name, "kind": kind, "line": line})


def _size(f: CloudInitFile, kind: str, limit: int) -> None:
    size = len(f.text.encode())
    if size > limit:
        raise _bad(f, kind, f"{size} bytes is more than the {limit >> 10} KiB allowed",
                   "make the file smaller (e.g. fetch large content from the guest with runcmd)")
    if "\x00" in f.text:
        raise _bad(f, kind, "holds a NUL byte: not a text file", "give a text file")


def _yaml(f: CloudInitFile, kind: str) -> Any:
    """The file's YAML document; a syntax error names its line (1-based) and what is wrong."""
    try:
        return yaml.safe_load(f.text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and start.line + 1 != line:
            problem += f"; {context} on line {start.line + 1}"
        raise _bad(f, kind, f"is not valid YAML ({problem})",
                   "fix the YAML there (indent with spaces, quote values holding ': ' or '#')", line) from None
    except (ValueError, TypeError) as exc:      # a scalar YAML resolves but cannot build, e.g. date 2024-13-45
        raise _bad(f, kind, f"has a value YAML cannot read ({exc})", "quote the value") from None
    except RecursionError:
        raise _bad(f, kind, "nests too deeply", "flatten the YAML") from None


def _key_line(f: CloudInitFile, kind: str, key: str) -> int | None:
    """The line of a top-level key, for messages."""
    m = re.search(rf"^{re.escape(key)}\s*:", f.text, re.MULTILINE)
    return f.text.count("\n", 0, m.start()) + 1 if m else None


def check_user_data(f: CloudInitFile) -> dict[str, Any] | None:
    """The cloud-config mapping (None for a script)."""
    kind = "user-data"
    _size(f, kind, MAX_USER_DATA_BYTES)
    first = f.text.split("\n", 1)[0].rstrip("\r")
    if first.startswith("#!"):
        return None
    if first.strip() != "#cloud-config":
        raise _bad(f, kind, f"starts with {first[:40]!r}, not '#cloud-config' or '#!'",
                   "make '#cloud-config' its first line (YAML), or '#!/bin/sh' for a script", 1)
    doc = _yaml(f, kind)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _bad(f, kind, f"is YAML, but a {type(doc).__name__}, not a mapping of settings",
                   "write settings as 'key: value' lines, e.g. 'hostname: web1'", 2)
    for key in ("users", "ssh_authorized_keys", "runcmd", "write_files", "packages"):
        if key in doc and doc[key] is not None and not isinstance(doc[key], list):
            raise _bad(f, kind, f"'{key}' is a {type(doc[key]).__name__}, not a list",
                       f"write '{key}:' followed by '- ...' items", _key_line(f, kind, key))
    return doc


def check_network_config(f: CloudInitFile) -> None:
    kind = "network-config"
    _size(f, kind, MAX_SMALL_FILE_BYTES)
    doc = _yaml(f, kind)
    if isinstance(doc, dict) and set(doc) == {"network"}:
        doc = doc["network"]
    if not isinstance(doc, dict):
        raise _bad(f, kind, "is not a YAML mapping", "write 'version: 2' and 'ethernets:' (or version 1 'config:')")
    version = doc.get("version")
    if version not in (1, 2):
        raise _bad(f, kind, f"has version {version!r}, not 1 or 2", "add 'version: 2' (or 1)",
                   _key_line(f, kind, "version"))
    if version == 1 and not isinstance(doc.get("config"), list):
        raise _bad(f, kind, "is version 1 without a 'config:' list", "add 'config:' with '- type: physical' items",
                   _key_line(f, kind, "config"))
    unknown = sorted(set(doc) - V2_KEYS) if version == 2 else []
    if unknown:
        raise _bad(f, kind, f"has unknown version 2 key {unknown[0]!r}", "use: " + ", ".join(sorted(V2_KEYS)),
                   _key_line(f, kind, unknown[0]))


def check_meta_data(f: CloudInitFile) -> dict[str, Any]:
    kind = "meta-data"
    _size(f, kind, MAX_SMALL_FILE_BYTES)
    doc = _yaml(f, kind)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _bad(f, kind, "is not a YAML mapping", "write 'key: value' lines, e.g. 'local-hostname: web1'")
    for key in ("instance-id", "local-hostname"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or not META_HOSTNAME.match(value)):
            raise _bad(f, kind, f"'{key}' is {value!r}: letters, digits, '.' and '-' only",
                       f"give '{key}' a plain name", _key_line(f, kind, key))
    return doc


def check_ssh_keys(f: CloudInitFile) -> list[str]:
    """The public keys, one a line (blank lines and '#' comments skipped); at least one."""
    kind = "ssh-key"
    _size(f, kind, MAX_SMALL_FILE_BYTES)
    keys = []
    for n, raw in enumerate(f.text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = key_problem(line)
        if problem is not None:
            raise _bad(f, kind, problem, "give the .pub file (ssh-keygen makes it): 'ssh-ed25519 AAAA... comment'", n)
        keys.append(line)
    if not keys:
        raise _bad(f, kind, "holds no public key", "give the .pub file, e.g. ~/.ssh/id_ed25519.pub")
    return keys


def key_problem(line: str) -> str | None:
    """Why a line is not an OpenSSH public key ('TYPE BASE64 [comment]'), or None."""
    if "PRIVATE KEY" in line:
        return "is a private key: never send it"
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        return f"starts with {parts[0][:30]!r}, not a key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256...)" \
            if parts else "is empty"
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return "has a key that is not base64"
    if len(blob) < 4 or blob[4:4 + struct.unpack(">I", blob[:4])[0]] != parts[0].encode():
        return f"has a key blob that is not a {parts[0]} key"
    return None


def seed_files(req: CloudInitRequest, uuid: str, vm_name: str) -> SeedFiles:
    """The seed's files, once every input file checked; ``--ssh-key`` lines join the cloud-config's keys."""
    cfg = check_user_data(req.user_data)
    keys = check_ssh_keys(req.ssh_key) if req.ssh_key is not None else []
    if req.network_config is not None:
        check_network_config(req.network_config)
    meta = check_meta_data(req.meta_data) if req.meta_data is not None else {}
    user_data = req.user_data.text
    if keys and cfg is None:
        raise _bad(req.user_data, "user-data", "is a script: --ssh-key needs a #cloud-config",
                   "write the script as runcmd in a #cloud-config, or drop --ssh-key", 1)
    if keys and cfg is not None:
        user_data = _with_keys(user_data, cfg, keys)
    meta = {"instance-id": uuid, "local-hostname": vm_name} | meta
    return SeedFiles(user_data=user_data, meta_data=yaml.safe_dump(meta, default_flow_style=False, sort_keys=False),
                     network_config=req.network_config.text if req.network_config is not None else None)


def _with_keys(text: str, cfg: dict[str, Any], keys: list[str]) -> str:
    """The user's text with the keys added to the default user's ``ssh_authorized_keys`` (re-written if needed)."""
    if "ssh_authorized_keys" not in cfg:
        added = text + ("" if text.endswith("\n") else "\n") + "ssh_authorized_keys:\n" + \
            "".join(f"  - {json.dumps(k)}\n" for k in keys)       # a JSON string is a YAML scalar
        try:
            again = yaml.safe_load(added)
        except yaml.YAMLError:
            again = None
        if isinstance(again, dict) and again.get("ssh_authorized_keys") == keys:
            return added              # the user's text kept as it is, comments and all
    merged = dict(cfg)
    merged["ssh_authorized_keys"] = list(cfg.get("ssh_authorized_keys") or []) + keys
    return "#cloud-config\n" + yaml.safe_dump(merged, default_flow_style=False, sort_keys=False, width=1 << 20)
