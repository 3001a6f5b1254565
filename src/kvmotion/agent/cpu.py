"""What CPUs this host can offer VMs: the host-passthrough model and the usable named models.

One short-lived ``qemu-system-x86_64 -machine none`` answers ``query-cpu-definitions`` and a full
``query-cpu-model-expansion`` per usable model.  Feature names are QEMU's canonical spelling
(``pni`` for sse3, ``sse4.1``, ``lahf-lm``, ...); every input (mask, ``minus``) may use any alias.
A lab *mask* hides features from this host and drops every named model that needs one of them,
so a host can pose as an older CPU generation.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kvmotion.agent.hv.qemu.qmp import QMPConnection
from kvmotion.common.errors import DeadlineExceeded, InvalidInputError, QemuStartFailed, QMPTimeout

HOST_PASSTHROUGH = "host-passthrough"
NOT_BASELINES = frozenset({"max", "host", "base"})
_VERSIONED = re.compile(r"^(?P<stem>.+)-v\d+$")

# Boolean QOM properties of an x86 CPU that are knobs of QEMU/KVM, not guest-visible CPU features.
_NON_FEATURE_PROPS = frozenset({
    "check", "enforce", "fill-mtrr-mask", "full-cpuid-auto-level", "cpuid-0xb", "migratable", "pmu",
    "l3-cache", "legacy-cache", "host-cache-info", "host-phys-bits", "lmce", "vmware-cpuid-freq",
    "tcg-cpuid", "realized", "start-powered-off",
})
_NON_FEATURE_PREFIXES = ("kvm", "hv-", "x-")   # kvm, kvm-*, kvm_*, kvmclock*, Hyper-V enlightenments, x-*

# QEMU's legacy aliases (x86_cpu_initfn); other "_" spellings map to "-".
_ALIASES = {
    "sse3": "pni", "pclmuldq": "pclmulqdq", "sse4-1": "sse4.1", "sse4_1": "sse4.1", "sse4-2": "sse4.2",
    "sse4_2": "sse4.2", "xd": "nx", "ffxsr": "fxsr-opt", "i64": "lm",
}

# Features QEMU drops together with another one (feature_dependencies in target/i386/cpu.c).
_DEPENDENTS: dict[str, frozenset[str]] = {
    "svm": frozenset({"npt", "lbrv", "svm-lock", "nrip-save", "tsc-scale", "vmcb-clean", "flushbyasid",
                      "decodeassists", "pause-filter", "pfthreshold", "avic", "v-vmsave-vmload", "vgif",
                      "svme-addr-chk"}),
    "arch-capabilities": frozenset({"rdctl-no", "ibrs-all", "rsba", "skip-l1dfl-vmentry", "ssb-no", "mds-no",
                                    "pschange-mc-no", "tsx-ctrl", "taa-no"}),
    "core-capability": frozenset({"split-lock-detect"}),
    "pdcm": frozenset({"full-width-write"}),
    "intel-pt": frozenset({"intel-pt-lip"}),
    "rdtscp": frozenset({"vmx-rdtscp-exit"}),
    "rdrand": frozenset({"vmx-rdrand-exit"}),
    "rdseed": frozenset({"vmx-rdseed-exit"}),
    "invpcid": frozenset({"vmx-invpcid-exit"}),
    "xsaves": frozenset({"vmx-xsaves"}),
    "mpx": frozenset({"vmx-exit-clear-bndcfgs", "vmx-entry-load-bndcfgs"}),
}
_DEPENDENT_PREFIXES = {"vmx": "vmx-", "sgx": "sgx"}   # vmx -> every vmx-*, sgx -> sgx1, sgx2, sgxlc, sgx-*


def canonical_feature(name: str) -> str:
    """QEMU's canonical spelling of a CPU feature name (``sse3`` -> ``pni``, ``lahf_lm`` -> ``lahf-lm``)."""
    name = name.strip()
    return _ALIASES.get(name, name.replace("_", "-"))


def _is_feature_prop(name: str) -> bool:
    return name not in _NON_FEATURE_PROPS and not name.startswith(_NON_FEATURE_PREFIXES)


def feature_names(props: dict[str, object]) -> frozenset[str]:
    """Enabled CPU features (canonical names) in a ``query-cpu-model-expansion`` ``props`` dict."""
    return frozenset(canonical_feature(k) for k, v in props.items() if v is True and _is_feature_prop(k))


def _with_dependents(names: Iterable[str], universe: frozenset[str]) -> frozenset[str]:
    """``names`` (canonicalised) plus every feature in ``universe`` that QEMU drops along with them."""
    out = {canonical_feature(n) for n in names}
    todo = list(out)
    while todo:
        f = todo.pop()
        deps = set(_DEPENDENTS.get(f, ()))
        prefix = _DEPENDENT_PREFIXES.get(f)
        if prefix is not None:
            deps |= {u for u in universe if u.startswith(prefix) and u != f}
        for d in deps - out:
            out.add(d)
            todo.append(d)
    return frozenset(out)


@dataclass(frozen=True)
class CpuCatalog:
    accelerator: str                       # "kvm" | "tcg"
    host_model: str                        # "host" under kvm, "max" under tcg
    host_features: frozenset[str]          # full expansion of host_model, minus the mask
    models: dict[str, frozenset[str]]      # usable named models -> full feature sets
    masked: frozenset[str]                 # features hidden by the (lab) mask, with their dependents
    aliases: dict[str, str] = field(default_factory=dict)   # e.g. "Nehalem" -> "Nehalem-v1"
    qemu_version: str = ""

    def usable_models(self) -> list[str]:
        return sorted(self.models)

    def is_host_model(self, model: str) -> bool:
        return model in (self.host_model, HOST_PASSTHROUGH)

    def expand(self, model: str, minus: Iterable[str] = ()) -> frozenset[str]:
        """Features a VM started with ``-cpu model,-f1,-f2`` sees on this host."""
        if self.is_host_model(model):
            base = self.host_features
        elif model in self.models:
            base = self.models[model]
        else:
            why = ("it needs a feature this host hides" if self.masked else "this host cannot provide it")
            raise InvalidInputError(
                f"CPU model {model!r} is not usable on this {self.accelerator} host ({why})",
                remedy=f"pick one of {', '.join(self.usable_models())} or {HOST_PASSTHROUGH}",
                details={"model": model, "usable": self.usable_models()},
            )
        return base - _with_dependents(minus, base)

    def cpu_option(self, model: str, minus: Iterable[str] = ()) -> str:
        """The ``-cpu`` argument that gives a VM ``expand(model, minus)`` (host model: the mask applied)."""
        self.expand(model, minus)   # validates the model
        drop = {canonical_feature(f) for f in minus}
        name = model
        if self.is_host_model(model):
            name, drop = self.host_model, drop | set(self.masked)
        return ",".join([name, *(f"-{f}" for f in sorted(drop))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "accelerator": self.accelerator, "host_model": self.host_model,
            "host_features": sorted(self.host_features),
            "models": {m: sorted(f) for m, f in sorted(self.models.items())},
            "masked": sorted(self.masked), "aliases": dict(sorted(self.aliases.items())),
            "qemu_version": self.qemu_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CpuCatalog":
        try:
            return cls(
                accelerator=str(data["accelerator"]), host_model=str(data["host_model"]),
                host_features=frozenset(map(str, data["host_features"])),
                models={str(m): frozenset(map(str, f)) for m, f in data["models"].items()},
                masked=frozenset(map(str, data.get("masked", ()))),
                aliases={str(a): str(t) for a, t in data.get("aliases", {}).items()},
                qemu_version=str(data.get("qemu_version", "")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"malformed CPU catalog: {exc!r}",
                                    remedy="send the output of catalog_to_json()/CpuCatalog.to_dict()",
                                    cause=exc) from exc


def catalog_to_json(catalog: CpuCatalog) -> str:
    return json.dumps(catalog.to_dict(), sort_keys=True)


def catalog_from_json(text: str) -> CpuCatalog:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"CPU catalog is not JSON: {exc}", remedy="send catalog_to_json() output",
                                cause=exc) from exc
    if not isinstance(data, dict):
        raise InvalidInputError("CPU catalog JSON is not an object", remedy="send catalog_to_json() output")
    return CpuCatalog.from_dict(data)


def evc_baselines(catalogs: list[CpuCatalog]) -> list[str]:
    """Named models usable on every host, richest (most features) first; plain aliases win over -vN."""
    if not catalogs:
        return []
    common = set.intersection(*(set(c.models) for c in catalogs)) - NOT_BASELINES
    alias_targets = {t for c in catalogs for a, t in c.aliases.items() if a in common}

    def duplicate(name: str) -> bool:
        if name in alias_targets:
            return True
        m = _VERSIONED.match(name)   # no alias info: same stem with the same features everywhere
        stem = m.group("stem") if m else None
        return stem in common and all(c.models[stem] == c.models[name] for c in catalogs)

    keep = [n for n in common if not duplicate(n)]
    return sorted(keep, key=lambda n: (-min(len(c.models[n]) for c in catalogs), n))


def _left(end: float, deadline_s: float, what: str) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"the CPU probe used up its {deadline_s:.0f}s deadline while {what}",
                               remedy="check the host load; raise deadline_s if the host is just slow")
    return left


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:].strip()
    except OSError:
        return ""


async def _connect(proc: subprocess.Popen[bytes], sock: Path, log: Path, end: float,
                   deadline_s: float) -> QMPConnection:
    conn = QMPConnection("cpu-probe", str(sock))
    while True:
        if proc.poll() is not None:
            raise QemuStartFailed(f"QEMU for the CPU probe exited with {proc.returncode}: {_log_tail(log)}",
                                  remedy="check the accelerator (is /dev/kvm usable?) and the QEMU binary")
        try:
            await conn.connect(deadline_s=min(1.0, _left(end, deadline_s, "waiting for QMP")))
            return conn
        except QMPTimeout:
            continue


async def _query_models(conn: QMPConnection, host_model: str, end: float, deadline_s: float
                        ) -> tuple[str, dict[str, Any], dict[str, str | None], dict[str, frozenset[str]]]:
    """QEMU's version, the host model's properties, the usable models (name -> alias target) and their features."""
    async def ask(cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await conn.execute(cmd, args, timeout=_left(end, deadline_s, f"running {cmd}"))

    ver = (await ask("query-version")).get("qemu", {})
    version = f"{ver.get('major')}.{ver.get('minor')}.{ver.get('micro')}"
    defs = await ask("query-cpu-definitions")

    async def expand(name: str) -> dict[str, Any]:
        res = await ask("query-cpu-model-expansion", {"type": "full", "model": {"name": name}})
        props: dict[str, Any] = res["model"]["props"]
        return props

    host_props = await expand(host_model)
    usable = {d["name"]: d.get("alias-of") for d in defs if not d.get("unavailable-features")}
    props_of: dict[str, dict[str, Any]] = {host_model: host_props}
    for name in sorted(n for n, target in usable.items() if not target or target not in usable):
        if name not in props_of:
            props_of[name] = await expand(name)
    raw = {n: feature_names(props_of[t] if t in props_of else props_of[n]) for n, t in usable.items()}
    return version, host_props, usable, raw


async def probe_cpu_catalog(accelerator: str, mask: Iterable[str] = (), binary: str = "qemu-system-x86_64",
                            deadline_s: float = 20.0) -> CpuCatalog:
    """Ask one throw-away ``-machine none`` QEMU which CPU models this host can run, within ``deadline_s``."""
    if accelerator not in ("kvm", "tcg"):
        raise InvalidInputError(f"unknown accelerator {accelerator!r}", remedy="use 'kvm' or 'tcg'")
    if shutil.which(binary) is None:
        raise QemuStartFailed(f"{binary} is not installed", remedy="install qemu-system-x86 on this host")
    mask = list(mask)
    host_model = "host" if accelerator == "kvm" else "max"
    end = time.monotonic() + deadline_s
    tmp = Path(tempfile.mkdtemp(prefix="kvmotion-cpuprobe-"))
    sock, log = tmp / "q.sock", tmp / "qemu.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [binary, "-machine", "none", "-accel", accelerator, "-nodefaults", "-display", "none",
                 "-qmp", f"unix:{sock},server=on,wait=off"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        conn = await _connect(proc, sock, log, end, deadline_s)
        try:
            version, host_props, usable, raw = await _query_models(conn, host_model, end, deadline_s)
        finally:
            await conn.close()
    finally:
        if proc is not None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    known = frozenset(canonical_feature(k) for k, v in host_props.items() if isinstance(v, bool)
                      and _is_feature_prop(k))
    unknown = sorted({canonical_feature(f) for f in mask} - known)
    if unknown:
        raise InvalidInputError(f"unknown CPU feature(s) in the mask: {', '.join(unknown)}",
                                remedy="use QEMU feature names (e.g. avx2, sse4.2); see "
                                       f"`{binary} -cpu help`", details={"unknown": unknown})
    host_raw = feature_names(host_props)
    masked = _with_dependents(mask, host_raw.union(*raw.values()))
    return CpuCatalog(
        accelerator=accelerator, host_model=host_model, host_features=host_raw - masked,
        models={n: f for n, f in raw.items() if not f & masked}, masked=masked,
        aliases={n: t for n, t in usable.items() if t and t in raw}, qemu_version=version,
    )
