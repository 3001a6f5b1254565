"""End to end, the lab of issue 20: `lab up --controllers 2 --hosts 2`. Two real controllers (A on 8760, B on
8761, same address), each managing its own two hosts, made one trust domain by the lab through their REST API;
every host sees the same shared datastore. B's admin token is unknown on A; B survives a restart (clean and
crashed) with its hosts and its domain; `down` leaves no namespace, process or folder."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmotion_lab import lab as lab_mod
from labtools import cli, controller_client, controller_http, leftovers, running_lab, wait_for

RESTART_DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 2, controllers=2) as info:
        yield info


def connected_hosts(lab, controller: str, since: float = 0.0) -> dict[str, str]:
    """The hosts the controller lists, with their state: "connected" only once it has had their facts after
    ``since`` (a restarted controller reads the state it stored; the facts show it reached the host again)."""
    with controller_http(lab, controller) as c:
        r = c.get("/api/v1/hosts")
    assert r.status_code == 200, r.text
    return {h["name"]: h["state"] if h["last_seen"] > since else "not seen since" for h in r.json()}


def members(lab, controller: str) -> dict[str, tuple[str, str]]:
    with controller_http(lab, controller) as c:
        r = c.get("/api/v1/domain/members")
    assert r.status_code == 200, r.text
    return {m["name"]: (m["state"], m["url"]) for m in r.json()}


def assert_domain_whole(lab) -> None:
    """A and B pin each other as members, in one domain, and each reaches the other over mutual TLS."""
    a, b = lab.controllers["a"], lab.controllers["b"]
    assert members(lab, "a") == {"ctl-b": ("member", b.url)}
    assert members(lab, "b") == {"ctl-a": ("member", a.url)}
    shown = {n: controller_client(lab, n).domain() for n in ("a", "b")}
    assert shown["a"]["domain_id"] == shown["b"]["domain_id"] and shown["a"]["domain_name"] == "lab"
    assert (shown["a"]["name"], shown["b"]["name"]) == ("ctl-a", "ctl-b")
    assert shown["a"]["fingerprint"] != shown["b"]["fingerprint"]
    for me, other in (("a", "ctl-b"), ("b", "ctl-a")):
        hello = controller_client(lab, me).ping_member(other)
        assert (hello["name"], hello["domain_id"]) == (other, shown["a"]["domain_id"])


def test_each_controller_has_exactly_its_own_two_hosts_connected(lab) -> None:
    assert connected_hosts(lab, "a") == {"h1": "connected", "h2": "connected"}
    assert connected_hosts(lab, "b") == {"h3": "connected", "h4": "connected"}
    assert [lab.controller_of(h).name for h in ("h1", "h2", "h3", "h4")] == ["a", "a", "b", "b"]
    b = lab.controllers["b"]
    assert b.url.endswith(":8761") and b.root == Path(lab.root) / "controllers" / "b" and b.admin_token_path.exists()


def test_every_host_sees_the_same_shared_datastore(lab) -> None:
    seen = {}
    for name in ("a", "b"):
        client = controller_client(lab, name)
        for host in lab.hosts_of(name):
            stores = {d["name"]: d for d in client.host(host)["facts"]["datastores"]}
            assert set(stores) == {"shared", f"{host}-local"} and stores["shared"]["readable"]
            seen[host] = (stores["shared"]["uuid"], stores["shared"]["shared"], stores["shared"]["path"])
    assert len(set(seen.values())) == 1 and next(iter(seen.values()))[1] is True
    assert next(iter(seen.values()))[2] == str(Path(lab.root) / "ds" / "shared")


def test_the_two_controllers_form_the_labs_domain(lab) -> None:
    assert_domain_whole(lab)
    out = cli(lab, "domain", "ping", "ctl-a", controller="b")           # B's admin with the product's CLI
    assert out.returncode == 0 and "ctl-a answers: domain lab" in out.stdout, out.stdout + out.stderr


def test_a_controllers_admin_token_is_unknown_on_the_other(lab) -> None:
    for caller, called in (("b", "a"), ("a", "b")):
        with controller_http(lab, called, token=lab.controllers[caller].admin_token()) as c:
            assert c.get("/api/v1/hosts").status_code == 401
            assert c.get("/api/v1/domain").status_code == 401
        with controller_http(lab, called) as c:
            assert c.get("/api/v1/hosts").status_code == 200


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "crash"])
def test_controller_b_restarts_with_its_hosts_and_its_domain(lab, crash) -> None:
    old, restarted_at = lab_mod.load(lab.root).pids["controller-b"], time.time()
    new = lab_mod.restart(lab.root, "controller-b", crash=crash)
    assert new != old and lab_mod.status(lab.root)["processes"]["controller-b"] == {"pid": new, "alive": True}
    assert lab_mod.load(lab.root).pids["controller"] == lab.pids["controller"]        # A was left alone
    wait_for(lambda: connected_hosts(lab, "b", since=restarted_at) == {"h3": "connected", "h4": "connected"},
             RESTART_DEADLINE_S, "B's hosts to be connected again")
    assert connected_hosts(lab, "a") == {"h1": "connected", "h2": "connected"}
    assert_domain_whole(lab)


def test_down_leaves_no_namespace_process_or_folder(lab) -> None:
    """Runs last: `down` here (running_lab's own `down` afterwards finds nothing left to do)."""
    pids = dict(lab_mod.load(lab.root).pids)
    assert {"controller", "controller-b", "agent-h1", "agent-h4"} <= set(pids)
    removed = lab_mod.down(lab.root)
    assert f"folder {lab.root}" in removed and not Path(lab.root).exists()
    assert leftovers(lab.net.prefix, Path(lab.root)) == {"namespaces": [], "qemu_pids": []}
    alive = {name: pid for name, pid in pids.items() if lab_mod.pid_is_ours(pid)}
    assert alive == {}, f"still running after down: {alive}"
    assert lab_mod.down(lab.root) == []
