"""The web client's browser tests' fixtures: a real Chromium (Playwright's sync API) against a real lab's controller.

The browser accepts only the lab controller's own HTTPS certificate: ``--ignore-certificate-errors-spki-list`` pins
the SHA-256 of that certificate's SubjectPublicKeyInfo (any other certificate error still fails). Sign-in goes
through the sign-in page, as an admin would, with a token: the lab's admin token, or a viewer token made with
``POST /api/v1/tokens``. Screenshots for the docs go to ``docs/ui/NAME.png`` at a fixed 1280x800 viewport.

A test module uses these with ``from webtools import ...`` (the fixtures ``web``, ``admin``, ``viewer``, ``vm``).
"""
from __future__ import annotations

import base64
import hashlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from kvmotion.cli.client import Client
from labtools import record_figure, remove_vm, running_vm

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "ui"
SLOW_MS = 120_000          # TCG guests are slow: a migration's phases, an evacuation, a console's first line
UI_MS = 20_000             # a page's own work (an API call, a render)
VM_NAME = "web1"
VIEWER_NAME = "webviewer"
SESSION_COOKIE = "kvmotion_session"

# Records, in the page, when each phase row (data-testid "phase-NAME") first appears and first shows as running,
# and when the report appears: Date.now() in milliseconds (the browser and the controller share this machine's clock).
PHASE_OBSERVER = """() => {
  const seen = {}, running = {}, marks = {};
  const scan = () => {
    const now = Date.now();
    for (const el of document.querySelectorAll('[data-testid^="phase-"]')) {
      const name = el.getAttribute('data-testid').slice(6);
      if (!(name in seen)) seen[name] = now;
      if (!(name in running) && el.classList.contains('phase-running')) running[name] = now;
    }
    if (!('report' in marks) && document.querySelector('[data-testid="report"]')) marks.report = now;
  };
  window.__kvmPhases = { seen, running, marks };
  new MutationObserver(scan).observe(document.body, { subtree: true, childList: true, attributes: true,
                                                      attributeFilter: ['class', 'data-testid'] });
  scan();
}"""

# Set before any page script runs (an init script): when the inventory's first host row is shown, relative to the
# navigation's start (performance.now() counts from the document's time origin).
INVENTORY_TIMER = """(() => {
  const mark = () => {
    if (window.__kvmInventoryShown === undefined && document.querySelector('[data-testid^="host-row-"]')) {
      window.__kvmInventoryShown = performance.now();
    }
  };
  new MutationObserver(mark).observe(document, { subtree: true, childList: true });
})();"""


def controller_cert_path(root: Path) -> Path:
    """The lab controller's HTTPS certificate (kvmotion.controller.apicert: ``pki/api-cert.pem`` beside its CA)."""
    return root / "pki" / "api-cert.pem"


def spki_pin(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's --ignore-certificate-errors-spki-list takes."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def browser_args(cert: Path) -> list[str]:
    return ["--no-sandbox", f"--ignore-certificate-errors-spki-list={spki_pin(cert.read_bytes())}"]


@dataclass
class Web:
    """One lab controller as a browser sees it: its URL, the Chromium that trusts only its certificate, tokens."""
    url: str
    browser: Any
    admin_token: str
    viewer_token: str
    ca: Path
    logs: dict[int, list[str]] = field(default_factory=dict)

    def new_page(self) -> Any:
        """A fresh browser context (its own cookies) and page at the fixed viewport."""
        ctx = self.browser.new_context(viewport=VIEWPORT)
        ctx.set_default_timeout(UI_MS)
        page = ctx.new_page()
        log: list[str] = []
        page.on("pageerror", lambda e: log.append(f"page error: {e}"))
        page.on("console", lambda m: log.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.logs[id(page)] = log
        return page

    def log(self, page: Any) -> str:
        """The page's script errors and console errors so far (for a failure's message)."""
        return "\n".join(self.logs.get(id(page), [])) or "(no script or console error)"

    def goto(self, page: Any, route: str = "") -> Any:
        """Open ``/ui/`` at a hash route ("#/inventory"); returns the document's response (its headers)."""
        return page.goto(f"{self.url}/ui/{route}")

    def sign_in(self, page: Any, token: str, expect_ok: bool = True) -> None:
        """Sign in through the sign-in page with ``token``; with ``expect_ok``, wait for the whoami badge."""
        self.goto(page, "#/signin")
        try:
            page.get_by_test_id("signin-token").wait_for()
        except PlaywrightError as exc:
            raise AssertionError(f"no sign-in form at {page.url}: {exc}\n{self.log(page)}") from None
        page.get_by_test_id("signin-token").fill(token)
        page.get_by_test_id("signin-submit").click()
        if expect_ok:
            expect(page.get_by_test_id("whoami")).to_be_visible()

    def signed_in(self, role: str) -> Any:
        """A new page signed in as the lab's admin ("admin") or the viewer token ("viewer")."""
        page = self.new_page()
        self.sign_in(page, self.admin_token if role == "admin" else self.viewer_token)
        return page

    def api(self, token: str | None = None) -> httpx.Client:
        """Raw HTTPS to the controller trusting only the lab's CA, with a bearer token: the admin's by default,
        none with ``token=""``."""
        token = self.admin_token if token is None else token
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"} if token else {},
                            verify=ssl.create_default_context(cafile=str(self.ca)), timeout=30)

    def client(self) -> Client:
        """The product's client as the lab's admin."""
        return Client(self.url, token=self.admin_token)


def screenshot(page: Any, name: str) -> Path:
    """docs/ui/NAME.png of the page as it is (the viewport, 1280x800)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    out = SHOTS / f"{name}.png"
    page.screenshot(path=str(out))
    return out


def measure_inventory_load(web: Web, figure: str = "webui inventory load") -> float:
    """Milliseconds from the navigation's start to the inventory's first host row shown, on a signed-in admin page
    opened fresh; recorded as a figure (never asserted against a bound)."""
    page = web.signed_in("admin")
    page.add_init_script(INVENTORY_TIMER)
    web.goto(page, "#/inventory")         # the same document (a hash route): the reload is the measured load
    page.reload()
    expect(page.locator('[data-testid^="host-row-"]').first).to_be_visible()
    ms = page.evaluate("() => window.__kvmInventoryShown")
    assert isinstance(ms, (int, float)) and ms > 0, f"the inventory timer did not fire: {ms!r}"
    record_figure(figure, ms, "ms")
    page.context.close()
    return float(ms)


def watch_phases(page: Any) -> None:
    """Start recording when the page shows each phase row (call before the task page is shown)."""
    page.evaluate(PHASE_OBSERVER)


def phases_seen(page: Any) -> dict[str, dict[str, float]]:
    """{"seen": {phase: ms}, "running": {phase: ms}, "marks": {"report": ms}} as recorded by watch_phases."""
    return page.evaluate("() => window.__kvmPhases")


def make_viewer(url: str, admin_token: str, ca: Path) -> str:
    """A viewer token, made as an admin would: ``POST /api/v1/tokens`` (its secret is shown once)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"},
                      verify=ssl.create_default_context(cafile=str(ca)), timeout=30) as c:
        r = c.post("/api/v1/tokens", json={"name": VIEWER_NAME, "role": "viewer"})
        assert r.status_code == 201, r.text
        return r.json()["token"]


@pytest.fixture(scope="module")
def web(lab) -> Iterator[Web]:
    """The lab's controller A with a headless Chromium that accepts only its certificate."""
    expect.set_options(timeout=UI_MS)
    root = Path(lab.root)
    ca = root / "pki" / "ca-cert.pem"
    admin_token = lab.admin_token()
    viewer_token = make_viewer(lab.controller_url, admin_token, ca)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=browser_args(controller_cert_path(root)))
        try:
            yield Web(lab.controller_url, browser, admin_token, viewer_token, ca)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def vm(lab) -> Iterator[str]:
    """A running guest on h1 (the tests may move it; they read where it is from the API)."""
    client = Client(lab.controller_url)
    running_vm(client, lab, VM_NAME)
    yield VM_NAME
    remove_vm(client, VM_NAME)


@pytest.fixture()
def admin(web: Web) -> Iterator[Any]:
    """A page signed in as the lab's admin, closed after the test."""
    page = web.signed_in("admin")
    yield page
    page.context.close()


@pytest.fixture()
def viewer(web: Web) -> Iterator[Any]:
    """A page signed in with the viewer token, closed after the test."""
    page = web.signed_in("viewer")
    yield page
    page.context.close()
