"""Paged lists (GET /vms, /hosts, /tasks; controller/listing.py): keyset order, cursor continuation across inserts
and deletes, limits, bad cursors, filters, the summary view; and the CLI client following the cursor."""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert

from kvmotion.cli.client import Client
from kvmotion.common.errors import InvalidInputError
from kvmotion.controller import auth, listing
from kvmotion.controller.api import create_app
from kvmotion.controller.db import VM, Host, Task
from kvmotion.controller.service import Controller

HOSTS = [f"h{i:02d}" for i in range(7)]
VMS = [f"vm{i:03d}" for i in range(23)]


def seed(ctl: Controller) -> None:
    now = time.time()            # recent: the controller's monitor, running under the TestClient, keeps them
    with ctl.engine.begin() as c:
        c.execute(insert(Host), [dict(name=h, address="https://198.18.0.1:8770", cluster="c1" if i % 2 else None,
                                      state="disconnected" if i == 3 else "connected",
                                      facts_json=json.dumps({"cpu_count": 8})) for i, h in enumerate(HOSTS)])
        c.execute(insert(VM), [dict(uuid=str(uuid.uuid4()), name=n, host=HOSTS[i % 3],
                                    power_state="poweredOff" if i % 4 == 0 else "poweredOn",
                                    spec_json=json.dumps({"memory_mb": 256, "name": n})) for i, n in enumerate(VMS)])
        # 12 tasks, several created in the same second: the order falls back on the id
        c.execute(insert(Task), [dict(id=f"{i:02d}" + str(uuid.uuid4())[2:], kind="vmotion", vm_uuid="u",
                                      vm_name=f"vm{i}", state="success", created_at=now - 100 + i // 3,
                                      finished_at=now - 50 + i) for i in range(12)])


@pytest.fixture()
def ctl(tmp_path: Path, db_url: str) -> Iterator[Controller]:
    c = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    seed(c)
    yield c
    c.engine.dispose()


@pytest.fixture()
def http(ctl: Controller, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ctl)) as client:
        token = (tmp_path / auth.ADMIN_TOKEN_FILE).read_text().strip()
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def every_page(fetch: Any) -> list[list[Any]]:
    pages, cursor = [], None
    while True:
        page = fetch(cursor)
        pages.append(page.items)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def test_vms_come_by_name_a_page_at_a_time_and_the_last_page_names_no_cursor(ctl: Controller) -> None:
    pages = every_page(lambda c: listing.vm_page(ctl.sessions, 5, c))
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    assert [v.name for p in pages for v in p] == VMS
    assert pages[0][0].spec == {"memory_mb": 256, "name": "vm000"}             # full: the spec as stored
    exact = every_page(lambda c: listing.vm_page(ctl.sessions, 23, c))
    assert len(exact) == 1                                # exactly the limit: no empty page after it


def test_a_cursor_continues_after_its_row_whatever_was_added_or_removed_meanwhile(ctl: Controller) -> None:
    first = listing.vm_page(ctl.sessions, 5)
    assert [v.name for v in first.items] == VMS[:5]
    with ctl.engine.begin() as c:
        c.execute(delete(VM).where(VM.name.in_(["vm004", "vm005"])))          # the cursor's own row and the next
        c.execute(insert(VM), [dict(uuid=str(uuid.uuid4()), name=n, host="h00", spec_json="{}")
                               for n in ("vm001a", "vm0050")])                # one before the cursor, one after
    second = listing.vm_page(ctl.sessions, 5, first.next_cursor)
    assert [v.name for v in second.items] == ["vm0050", "vm006", "vm007", "vm008", "vm009"]


def test_the_summary_view_has_no_spec_and_the_filters_narrow_the_list(ctl: Controller) -> None:
    summary = listing.vm_page(ctl.sessions, 500, view="summary").items
    assert [v.name for v in summary] == VMS and not hasattr(summary[0], "spec")
    on_h1 = every_page(lambda c: listing.vm_page(ctl.sessions, 2, c, "summary", host="h01"))
    assert [v.name for p in on_h1 for v in p] == [n for i, n in enumerate(VMS) if i % 3 == 1]
    off = listing.vm_page(ctl.sessions, 500, power_state="poweredOff").items
    assert [v.name for v in off] == [n for i, n in enumerate(VMS) if i % 4 == 0]
    hosts = every_page(lambda c: listing.host_page(ctl.sessions, 2, c, "summary", cluster="c1"))
    assert [h.name for p in hosts for h in p] == ["h01", "h03", "h05"]
    assert [h.name for h in listing.host_page(ctl.sessions, state="disconnected").items] == ["h03"]
    assert listing.host_page(ctl.sessions, 1).items[0].facts == {"cpu_count": 8}


def test_tasks_come_newest_first_and_ties_in_time_by_id(ctl: Controller) -> None:
    pages = every_page(lambda c: listing.task_page(ctl.sessions, 5, c))
    got = [t.id for p in pages for t in p]
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [i[:2] for i in got] == ["11", "10", "09", "08", "07", "06", "05", "04", "03", "02", "01", "00"]


@pytest.mark.parametrize("cursor", ["not base64 !", base64.urlsafe_b64encode(b"[1,2]").decode(),
                                    listing.encode_cursor("hosts", ["h01"]),          # another list's cursor
                                    listing.encode_cursor("vms", [5]),               # a key of the wrong type
                                    listing.encode_cursor("vms", ["a", "b"])])
def test_a_cursor_that_is_not_one_of_this_list_is_refused_with_the_fix(ctl: Controller, cursor: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        listing.vm_page(ctl.sessions, 5, cursor)
    assert "GET /vms" in str(err.value) and "X-Next-Cursor" in (err.value.remedy or "")


def test_a_limit_out_of_range_is_refused_by_the_service_too(ctl: Controller) -> None:
    for limit in (0, listing.MAX_LIMIT + 1):
        with pytest.raises(InvalidInputError) as err:
            listing.host_page(ctl.sessions, limit)
        assert "5000" in (err.value.remedy or "")
    with pytest.raises(InvalidInputError):
        listing.task_page(ctl.sessions, listing.TASK_MAX_LIMIT + 1)


def test_the_api_answers_a_list_and_names_the_next_page_in_its_headers(http: TestClient) -> None:
    r = http.get("/api/v1/vms", params={"limit": 10, "view": "summary", "power_state": "poweredOn"})
    assert r.status_code == 200 and len(r.json()) == 10 and set(r.json()[0]) == {"uuid", "name", "host",
                                                                                 "power_state"}
    cursor = r.headers["X-Next-Cursor"]
    link = r.headers["Link"]
    assert link.startswith("</api/v1/vms?") and link.endswith('>; rel="next"') and "power_state=poweredOn" in link
    r2 = http.get(link[1:link.index(">")])
    assert r2.status_code == 200 and r2.json()[0]["name"] > r.json()[-1]["name"]
    assert "X-Next-Cursor" not in r2.headers and "Link" not in r2.headers           # 17 powered on: the last page
    assert http.get("/api/v1/vms", params={"limit": 10, "cursor": cursor, "view": "summary",
                                           "power_state": "poweredOn"}).json() == r2.json()
    assert "spec" in http.get("/api/v1/vms", params={"limit": 1}).json()[0]      # full by default, as before
    assert len(http.get("/api/v1/hosts").json()) == len(HOSTS)                # the default limit: all 7


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 5001}, {"limit": "many"}, {"cursor": "%%%"},
                                   {"cursor": "x" * 600}, {"view": "tiny"}, {"power_state": "on"},
                                   {"offset": 10}])
def test_bad_paging_input_is_a_422_invalid_input_with_a_remedy(http: TestClient, query: dict[str, Any]) -> None:
    r = http.get("/api/v1/vms", params=query)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "INVALID_INPUT" and err["remedy"]


def test_the_tasks_list_pages_the_same_way(http: TestClient) -> None:
    r = http.get("/api/v1/tasks", params={"limit": 7})
    assert [t["id"][:2] for t in r.json()] == ["11", "10", "09", "08", "07", "06", "05"]
    r2 = http.get("/api/v1/tasks", params={"limit": 7, "cursor": r.headers["X-Next-Cursor"]})
    assert [t["id"][:2] for t in r2.json()] == ["04", "03", "02", "01", "00"] and "X-Next-Cursor" not in r2.headers
    light = http.get("/api/v1/tasks", params={"limit": 7, "view": "summary"})
    assert [t["id"] for t in light.json()] == [t["id"] for t in r.json()]
    assert "phases" not in light.json()[0] and light.json()[0]["state"] == "success"
    bad = http.get("/api/v1/tasks", params={"cursor": listing.encode_cursor("vms", ["vm001"])})
    assert bad.status_code == 422 and "GET /tasks" in bad.json()["error"]["message"]


def test_the_cli_client_follows_the_cursor_to_the_end(http: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    asked: list[dict[str, Any]] = []

    def request(method: str, url: str, params: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        asked.append(dict(params or {}))
        r = http.request(method, url.removeprefix("http://ctl"), params=params)
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)
    monkeypatch.setattr(httpx, "request", request)
    client = Client("http://ctl", token=http.headers["Authorization"].split()[1])
    assert [v["name"] for v in client.vms(page_size=4)] == VMS
    assert len(asked) == 6 and "cursor" not in asked[0] and asked[1]["cursor"]
    assert [v["name"] for v in client.vms(host="h02", page_size=4)] == [n for i, n in enumerate(VMS) if i % 3 == 2]
    assert [h["name"] for h in client.hosts(cluster="c1", page_size=2)] == ["h01", "h03", "h05"]


def test_a_page_of_full_vms_carries_no_wrapped_key(ctl: Controller, http: TestClient) -> None:
    """The page is serialized by the VM model's own adapter: an encrypted disk's wrapped passphrase is shown only as
    its fingerprint, as in GET /vms/{ref}."""
    spec = {"name": "zz-enc", "disks": [{"node": "vda", "encrypted": True, "key_wrapped": "WRAPPED-SECRET-KEY"}]}
    with ctl.engine.begin() as c:
        c.execute(insert(VM), [dict(uuid=str(uuid.uuid4()), name="zz-enc", host="h00", spec_json=json.dumps(spec))])
    r = http.get("/api/v1/vms", params={"cursor": listing.encode_cursor("vms", ["vm022"])})
    assert [v["name"] for v in r.json()] == ["zz-enc"] and "WRAPPED-SECRET-KEY" not in r.text
    assert r.json()[0]["spec"]["disks"][0]["key_wrapped"].startswith("sha256:")
