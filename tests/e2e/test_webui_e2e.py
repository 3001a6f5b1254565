"""End to end, in the lab, with a real browser: the web client at /ui (headless Chromium driven by Playwright, pinned
to the lab controller's own certificate) against its contract, docs/web-client.md: sign-in, the security of the
session (CSP, cookie, CSRF, no token in the page), the inventory, the Migrate wizard's compatibility check and
review, a migration started from the wizard and followed live to its report, what a viewer may not do, maintenance
mode from the host page, and the serial console across a migration. Screenshots for the docs: docs/ui/*.png.

Measured, never asserted against a bound (labtools.record_figure): the inventory's load time and the delay from a
phase's start (the task's started_at) to the browser showing it."""
from __future__ import annotations

import re
import statistics

from playwright.sync_api import Error as PlaywrightError, expect

from kvmotion_lab import scenario
from labtools import assert_guest_survived, http_beat, record_figure, wait_for
import webtools
from webtools import SESSION_COOKIE, SLOW_MS, Web, measure_inventory_load, phases_seen, screenshot, watch_phases

web, vm, admin, viewer = webtools.web, webtools.vm, webtools.admin, webtools.viewer     # this module's fixtures

CURRENT = re.compile(r"\bcurrent\b")
SEV_ERROR = re.compile(r"\bsev-error\b")
# The page's own module (the same instance the app uses): its session's CSRF token goes with its calls.
APP_API = "() => import(new URL('api.js', document.querySelector('script[type=module]').src).href)"


def other(host: str) -> str:
    return "h2" if host == "h1" else "h1"


def page_json(page, path: str) -> dict:
    """GET ``path`` from the page with its cookie (no bearer token): status and body."""
    return page.evaluate("p => fetch(p, {credentials: 'same-origin'}).then(async r => "
                         "({status: r.status, body: await r.json()}))", path)


def set_maintenance(web: Web, host: str, enter: bool) -> None:
    """Through the API (the wizard test's blocking finding), waiting for the state: 1 in maintenance, 0 not."""
    c = web.client()
    task = c.maintenance(host, enter)
    if isinstance(task, dict) and task.get("id") and task.get("state") in ("queued", "running"):
        assert scenario.follow_task(c, task["id"], 300)["state"] == "success"
    wait_for(lambda: c.host(host)["maintenance"] == (1 if enter else 0), 120, f"{host} maintenance={enter}")


EVICTED = "No resource with given identifier found"     # Chromium dropped that body from its buffer


def response_body(r) -> str | None:
    """A response's body, or None when Chromium no longer holds it (an API answer read long before: the page's
    own re-reads; DevTools keeps a bounded buffer). Any other error is raised."""
    try:
        return r.text()
    except PlaywrightError as exc:
        if EVICTED in str(exc):
            return None
        raise


def test_sign_in_shows_whoami_and_a_wrong_token_the_api_error(web: Web) -> None:
    page = web.new_page()
    web.sign_in(page, web.admin_token)
    me = page_json(page, "/ui/session")
    assert me["status"] == 200 and me["body"]["role"] == "admin", me
    expect(page.get_by_test_id("whoami")).to_have_text(f"{me['body']['name']} (admin)")
    page.context.close()

    page = web.new_page()
    wrong = "kvm_" + "0" * 40
    web.sign_in(page, wrong, expect_ok=False)
    with web.api(token="") as anon:
        r = anon.post("/ui/session", json={"token": wrong})
    assert r.status_code in (401, 403), r.text
    err = r.json()["error"]
    box = page.get_by_test_id("error")
    expect(box).to_contain_text(err["message"])
    expect(box).to_contain_text(err["remedy"])
    expect(page.get_by_test_id("whoami")).to_have_count(0)
    page.context.close()


def test_session_security_csp_cookie_csrf_and_no_token_in_the_page(web: Web) -> None:
    page = web.new_page()
    with page.expect_response(lambda r: r.url.endswith("/ui/session") and r.request.method == "POST") as signin:
        web.sign_in(page, web.admin_token)
    answer = signin.value.text()
    assert "csrf" in answer and web.admin_token not in answer, "the sign-in's answer must not carry the token"
    seen = []
    page.on("response", lambda r: seen.append(r))
    doc = page.reload()
    csp = doc.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
    for rule in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                 "object-src 'none'"):
        assert rule in csp, (rule, csp)
    assert doc.headers["x-content-type-options"] == "nosniff"
    expect(page.get_by_test_id("whoami")).to_be_visible()          # the reloaded page is signed in by its cookie
    expect(page.locator('[data-testid^="host-row-"]').first).to_be_visible()     # and has read the inventory
    cookie = {c["name"]: c for c in page.context.cookies()}[SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
    assert web.admin_token not in cookie["value"]

    # a state-changing call from the page without X-CSRF-Token: refused, and nothing was made
    refused = page.evaluate("""() => fetch('/api/v1/tokens', {method: 'POST', credentials: 'same-origin',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({name: 'csrfprobe', role: 'viewer'})})
        .then(async r => ({status: r.status, body: await r.json()}))""")
    assert refused["status"] == 403 and refused["body"]["error"]["code"] == "CSRF_REJECTED", refused
    assert "csrfprobe" not in [t["name"] for t in web.client().tokens()]
    # the same call with the page's CSRF token is accepted: the header was what was missing
    made = page.evaluate(f"async () => (await ({APP_API})()).post('/tokens', {{name: 'csrfprobe', role: 'viewer'}})")
    assert made["name"] == "csrfprobe"
    web.client().revoke_token("csrfprobe")

    # the token is nowhere the page's scripts can read: not in document.cookie, storage, the DOM, any response
    visible = page.evaluate("() => [document.cookie, JSON.stringify({...localStorage}),"
                            " JSON.stringify({...sessionStorage}), document.documentElement.outerHTML]")
    assert SESSION_COOKIE not in visible[0]
    assert not any(web.admin_token in v for v in visible)
    checked = {"document": 0, "script": 0, "fetch": 0}
    for r in seen:
        kind = r.request.resource_type
        if (kind not in checked or "event-stream" in r.headers.get("content-type", "")
                or r.status in (204, 304) or 300 <= r.status < 400):
            continue
        body = response_body(r)
        if body is None:
            continue
        assert web.admin_token not in body, f"the token is in the response of {r.url}"
        checked[kind] += 1
    assert all(checked.values()), checked       # the document, every script and some API answers were read
    page.context.close()


def test_inventory_shows_the_hosts_and_the_vm(web: Web, admin, vm: str, lab) -> None:
    web.goto(admin, "#/inventory")
    for h in lab.net.hosts:
        expect(admin.get_by_test_id(f"host-row-{h.name}")).to_be_visible()
    host = web.client().vm(vm)["host"]
    admin.get_by_test_id("tab-vms").click()
    row = admin.get_by_test_id(f"vm-row-{vm}")
    expect(row).to_be_visible()
    expect(row).to_contain_text(host)
    screenshot(admin, "inventory")
    measure_inventory_load(web)


def open_wizard(web: Web, page, vm: str) -> None:
    """The VM's page, its Migrate… action, the wizard's first step."""
    web.goto(page, f"#/vms/{vm}")
    page.get_by_test_id("vm-migrate").click()
    expect(page.get_by_test_id("wizard-step-type")).to_have_class(CURRENT)


def step_to(page, step: str) -> None:
    """Next until ``step`` is the current step (Next waits while the compatibility check runs)."""
    target = page.get_by_test_id(f"wizard-step-{step}")
    for _ in range(7):
        if CURRENT.search(target.get_attribute("class") or ""):
            return
        page.get_by_test_id("wizard-next").click(timeout=SLOW_MS)
    expect(target).to_have_class(CURRENT)


def to_compatibility(web: Web, page, vm: str, dest: str) -> None:
    """A vMotion of ``vm`` to ``dest`` through the wizard, up to its compatibility step (checked)."""
    open_wizard(web, page, vm)
    page.get_by_test_id("wizard-type-vmotion").click()      # (a pick redraws the step: click, then look)
    expect(page.get_by_test_id("wizard-type-vmotion")).to_be_checked()
    step_to(page, "compute")
    page.get_by_test_id(f"wizard-host-{dest}").click()
    expect(page.get_by_test_id(f"wizard-host-{dest}")).to_be_checked()
    step_to(page, "compatibility")
    expect(page.get_by_test_id("wizard-recheck")).to_be_enabled(timeout=SLOW_MS)


def test_wizard_compatibility_blocks_then_passes(web: Web, admin, vm: str) -> None:
    dest = other(web.client().vm(vm)["host"])
    set_maintenance(web, dest, True)                    # a real blocking finding: the destination is in maintenance
    try:
        to_compatibility(web, admin, vm, dest)
        finding = admin.get_by_test_id("finding-HOST_IN_MAINTENANCE")
        expect(finding).to_be_visible()
        expect(finding).to_have_class(SEV_ERROR)
        expect(admin.get_by_test_id("compat-blocked")).to_be_visible()
        expect(admin.get_by_test_id("wizard-next")).to_be_disabled()
        screenshot(admin, "wizard-compatibility")
    finally:
        set_maintenance(web, dest, False)
    admin.get_by_test_id("wizard-recheck").click()           # fixed: the same destination, checked again
    expect(admin.get_by_test_id("wizard-recheck")).to_be_enabled(timeout=SLOW_MS)
    expect(admin.get_by_test_id("finding-HOST_IN_MAINTENANCE")).to_have_count(0)
    expect(admin.get_by_test_id("compat-blocked")).to_have_count(0)
    expect(admin.locator(".sev-error")).to_have_count(0)
    step_to(admin, "review")
    for tid in ("review-total", "review-downtime", "review-encryption"):
        expect(admin.get_by_test_id(tid)).not_to_be_empty()
    expect(admin.get_by_test_id("review-encryption")).to_contain_text(re.compile(r"tls|plain"))
    expect(admin.get_by_test_id("wizard-finish")).to_be_enabled()
    screenshot(admin, "wizard-review")


def phase_latencies(task: dict, page_seen: dict) -> list[float]:
    """Per phase: when the browser first showed its row (ms, the page's clock) minus its started_at (the
    controller's clock, same machine), in ms."""
    return [page_seen["seen"][p["name"]] - p["started_at"] * 1000 for p in task["phases"]]


def test_migration_from_the_wizard_is_followed_live_to_its_report(web: Web, admin, vm: str, lab) -> None:
    src = web.client().vm(vm)["host"]
    before = http_beat(lab, web.client(), vm)          # the guest as a client sees it, over its network
    dest = other(src)
    to_compatibility(web, admin, vm, dest)
    expect(admin.get_by_test_id("compat-blocked")).to_have_count(0)
    step_to(admin, "review")
    watch_phases(admin)                    # from here the page records when each phase row shows (no reload follows)
    admin.get_by_test_id("wizard-finish").click()
    expect(admin).to_have_url(re.compile(r"#/tasks/[^/]+$"))
    task_id = admin.url.rsplit("/", 1)[-1]
    expect(admin.get_by_test_id("task-state")).to_have_text("success", timeout=SLOW_MS * 3)
    expect(admin.get_by_test_id("report")).to_be_visible()
    task = web.client().task(task_id)
    assert task["state"] == "success" and task["destination"] == dest, task.get("error")
    assert_guest_survived(lab, web.client(), vm, before)     # same boot, heartbeat went on, answered the client
    seen = phases_seen(admin)
    names = [p["name"] for p in task["phases"]]
    assert [n for n in names if n in seen["seen"]] == names, (names, seen)
    # live, not drawn once at the end: the page showed phases running (the final state has none), at more than
    # one moment, and every phase that ran 2 s or more was shown running
    assert seen["running"] and set(seen["running"]) <= set(names), seen
    assert len({seen["seen"][n] for n in names}) > 1, seen
    long = [p["name"] for p in task["phases"] if (p["ended_at"] or 0) - p["started_at"] >= 2.0]
    assert all(n in seen["running"] for n in long), (long, seen["running"])
    r = task["result"]
    expect(admin.get_by_test_id("report-downtime")).to_contain_text(f"{r['downtime_ms']} ms")
    expect(admin.get_by_test_id("report-encryption")).to_contain_text(r["encryption"]["mode"])
    expect(admin.get_by_test_id("report-bytes")).not_to_be_empty()
    for n in names:
        expect(admin.get_by_test_id(f"phase-{n}")).to_have_class(re.compile(r"\bphase-ok\b"))
    screenshot(admin, "task")
    lat = phase_latencies(task, seen)
    record_figure("webui phase shown after its start, median", statistics.median(lat), "ms")
    record_figure("webui phase shown after its start, max", max(lat), "ms")
    assert web.client().vm(vm)["host"] == dest


def test_a_viewer_cannot_migrate(web: Web, viewer, vm: str) -> None:
    web.goto(viewer, f"#/vms/{vm}")
    expect(viewer.get_by_test_id("vm-power")).to_be_visible()
    expect(viewer.get_by_test_id("vm-host")).to_contain_text(web.client().vm(vm)["host"])
    expect(viewer.get_by_test_id("vm-migrate")).to_have_count(0)
    dest = other(web.client().vm(vm)["host"])
    # the API itself refuses it, with the page's session and CSRF token (a role refusal, not a CSRF one)
    err = viewer.evaluate(f"""async () => {{ const m = await ({APP_API})();
        try {{ await m.post('/vms/{vm}/migrate', {{host: '{dest}'}}); return null; }}
        catch (e) {{ return {{status: e.status, code: e.code, remedy: e.remedy}}; }} }}""")
    assert err is not None and err["status"] == 403 and err["code"] != "CSRF_REJECTED" and err["remedy"], err
    assert not [t for t in web.client().tasks() if t["vm_name"] == vm and t["state"] in ("queued", "running")]


def test_maintenance_from_the_host_page_evacuates_it(web: Web, admin, vm: str) -> None:
    host = web.client().vm(vm)["host"]
    web.goto(admin, f"#/hosts/{host}")
    expect(admin.get_by_test_id("host-maintenance")).to_have_text("off")
    admin.get_by_test_id("maintenance-enter").click()
    try:
        expect(admin).to_have_url(re.compile(r"#/tasks/[^/]+$"))        # the evacuation, followed live
        wait_for(lambda: web.client().host(host)["maintenance"] == 1, SLOW_MS / 1000 * 2, f"{host} in maintenance")
        expect(admin.get_by_test_id("task-state"), "the evacuation's task page, still shown when it ends (not "
               "replaced by a late redraw of the host page)").to_have_text("success")
        assert web.client().vm(vm)["host"] == other(host)            # evacuated: its VM runs on the other host
        web.goto(admin, f"#/hosts/{host}")
        expect(admin.get_by_test_id("host-maintenance")).to_have_text("on")
        admin.get_by_test_id("maintenance-exit").click()
        expect(admin.get_by_test_id("host-maintenance")).to_have_text("off", timeout=SLOW_MS)
    finally:
        if web.client().host(host)["maintenance"]:
            set_maintenance(web, host, False)
    assert web.client().host(host)["maintenance"] == 0
    web.goto(admin, f"#/vms/{vm}")
    expect(admin.get_by_test_id("vm-host")).to_contain_text(other(host))


BEAT = re.compile(r"KVMOTION-HEARTBEAT seq=(\d+) uptime=\S+ boot_id=(\S+)")
# Every class the console's status line takes from now on (a closed session would show as st-closed).
STATUS_OBSERVER = """() => {
  const seen = new Set();
  const scan = () => { const el = document.querySelector('[data-testid="console-status"]');
                       if (el) el.classList.forEach(c => seen.add(c)); };
  window.__kvmStatus = seen;
  new MutationObserver(scan).observe(document.body, { subtree: true, childList: true, attributes: true,
                                                      attributeFilter: ['class'] });
  scan();
}"""


def console_beats(page) -> list[tuple[int, str]]:
    """(seq, boot id) of every whole guest heartbeat line on the serial console's screen (not the last line: it
    may still be arriving)."""
    lines = page.get_by_test_id("console-screen").inner_text().split("\n")[:-1]
    return [(int(m.group(1)), m.group(2)) for m in map(BEAT.search, lines) if m]


def test_serial_console_shows_output_and_stays_connected_across_a_migration(web: Web, admin, vm: str) -> None:
    c = web.client()
    dest = other(c.vm(vm)["host"])
    web.goto(admin, f"#/vms/{vm}/console/serial")
    status = admin.get_by_test_id("console-status")
    expect(status).to_have_class(re.compile(r"\bst-connected\b"), timeout=SLOW_MS)
    expect(admin.get_by_test_id("console-screen")).to_contain_text("KVMOTION-HEARTBEAT", timeout=SLOW_MS)
    admin.evaluate(STATUS_OBSERVER)
    boot = console_beats(admin)[-1][1]
    task = scenario.follow_task(c, c.migrate(vm, dest)["id"], 600)
    assert task["state"] == "success", task.get("error")
    at_end = max(s for s, _ in console_beats(admin))
    # the same session carries on: the guest's counter continues past the move, same boot, never closed
    wait_for(lambda: max(s for s, _ in console_beats(admin)) > at_end, 120, "a heartbeat on the console after the move")
    expect(status).to_have_class(re.compile(r"\bst-connected\b"), timeout=SLOW_MS)
    expect(status).to_contain_text(dest)
    assert {b for _, b in console_beats(admin)} == {boot}
    classes = admin.evaluate("() => [...window.__kvmStatus]")
    assert "st-closed" not in classes, classes
