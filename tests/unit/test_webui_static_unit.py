"""The web client's static files without a browser: every module the page imports is one the controller serves,
no module writes HTML or inline style from data, and the shell, inventory, object and event pages carry the
test ids docs/web-client.md promises (the browser itself: tests/e2e/test_webui_e2e.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmotion.controller.webui.routes import ASSET

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "src" / "kvmotion" / "controller" / "webui" / "static"
DOC = ROOT / "docs" / "web-client.md"
IMPORT = re.compile(r"""^\s*(?:import|export)\s[^;]*?from\s+["']([^"']+)["']|^\s*import\s+["']([^"']+)["']""", re.M)
SINKS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", ".style.",
         "setAttribute(\"style\"", "setAttribute(\"on")
# the shell, inventory, host and VM pages, events: the modules that carry these ids (docs/web-client.md)
OWNED = ("sign-in", "inventory", "host page", "VM page", "events")


def modules() -> list[Path]:
    return sorted(STATIC.glob("*.js"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_imports_are_served_files(path: Path) -> None:
    for m in IMPORT.finditer(path.read_text()):
        target = m.group(1) or m.group(2)
        assert target.startswith("./"), f"{path.name} imports {target!r}: only the page's own modules (./NAME.js)"
        name = target[2:]
        assert ASSET.match(name), f"{path.name} imports {name!r}, a name /ui/{{name}} does not serve"
        assert (STATIC / name).is_file(), f"{path.name} imports {name!r}, which is not in the static folder"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_no_html_or_inline_style_from_code(path: Path) -> None:
    text = path.read_text()
    found = [s for s in SINKS if s in text]
    assert not found, f"{path.name} uses {found}: build the DOM with h() and style with classes (the CSP forbids it)"


def promised_ids() -> list[str]:
    section = DOC.read_text().split("## Test ids", 1)[1]
    ids = []
    for line in re.split(r"\n- ", section):
        if line.split(":", 1)[0].strip() in OWNED:
            ids += re.findall(r"`([a-z][a-z0-9-]*(?:-NAME)?)`", line)
    return ids


def test_owned_pages_carry_the_promised_test_ids() -> None:
    code = "\n".join(p.read_text() for p in modules())
    ids = promised_ids()
    assert len(ids) >= 25, ids                 # the doc's list was read
    missing = []
    for tid in ids:
        literal = tid.removesuffix("NAME")      # host-row-NAME: built as "host-row-" + name
        prefix, _, rest = tid.partition("-")    # tab-hosts, nav-events: built as "tab-" + id from a list
        built = prefix in ("tab", "nav") and f'"{prefix}-" +' in code and f'["{rest}"' in code
        exact = f'"{literal}" +' in code if tid.endswith("NAME") else f'"{tid}"' in code
        if not exact and not built:
            missing.append(tid)
    assert not missing, f"test ids promised by docs/web-client.md but in no module: {missing}"
