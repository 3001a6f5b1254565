"""Which package may import which: an AST scan of every module under src/ (module-level and function-level
imports alike). One table of rules; a violation names the module, its line and what it imports."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("kvmotion", "kvmotion_lab")


@dataclass(frozen=True)
class Rule:
    """Modules under ``scope`` may import, of the project's own packages, only ``allow`` (when given), and never
    ``forbid``; ``allow_modules`` may break the rule (named, with the reason in ``why``)."""

    scope: str
    why: str
    allow: tuple[str, ...] | None = None
    forbid: tuple[str, ...] = ()
    allow_modules: tuple[str, ...] = ()


RULES: tuple[Rule, ...] = (
    Rule("kvmotion.cli", "the CLI talks HTTP only: it carries no controller, agent or lab code",
         allow=("kvmotion.cli", "kvmotion.models", "kvmotion.common"),
         forbid=("kvmotion.common.hostauth",)),
    Rule("kvmotion.models", "the wire contract depends on nothing else of kvmotion", allow=("kvmotion.models",)),
    Rule("kvmotion.common", "shared by every side, so it depends on no side", allow=("kvmotion.common", "kvmotion.models")),
    Rule("kvmotion.agent", "an agent runs without the controller", forbid=("kvmotion.controller",)),
    Rule("kvmotion.controller", "the controller reaches agents over HTTP only", forbid=("kvmotion.agent",)),
    Rule("kvmotion.migration", "the engine gets its inventory, journal and host clients injected (ports), so a host "
         "of another controller is just another client", allow=("kvmotion.migration", "kvmotion.models",
                                                                "kvmotion.common", "kvmotion.checks")),
    Rule("kvmotion.checks", "prechecks are pure rules over gathered facts",
         allow=("kvmotion.checks", "kvmotion.models", "kvmotion.common", "kvmotion.migration.kinds")),
    Rule("kvmotion", "the product does not depend on its lab (the CLI finds it by entry point string only)",
         forbid=("kvmotion_lab",)),
)


@dataclass(frozen=True)
class Import:
    module: str       # the importing module
    line: int
    target: str       # the imported module (for `from X import y`: X.y when X.y is a module, else X)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(importer: str, package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative import."""
    base = importer.split(".") if package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(path: Path) -> list[Import]:
    """Every import in the module, at any depth (functions, classes, if-blocks, try-blocks)."""
    me = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(me, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(me, is_package(path), node.level, node.module) if node.level else node.module or ""
            found += [Import(me, node.lineno, _submodule(base, a.name)) for a in node.names]
    return found


def _submodule(base: str, name: str) -> str:
    """``from kvmotion.common import hostauth`` imports the module kvmotion.common.hostauth."""
    candidate = f"{base}.{name}"
    path = SRC.joinpath(*candidate.split("."))
    return candidate if path.with_suffix(".py").exists() or (path / "__init__.py").exists() else base


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def ours(name: str) -> bool:
    return any(within(name, p) for p in PACKAGES)


def violations(rule: Rule, imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if not within(imp.module, rule.scope) or imp.module in rule.allow_modules or not ours(imp.target):
            continue
        if any(within(imp.target, f) for f in rule.forbid) or (
                rule.allow is not None and not any(within(imp.target, a) for a in rule.allow)):
            bad.append(f"{imp.module} (line {imp.line}) imports {imp.target}")
    return bad


def all_imports() -> list[Import]:
    return [imp for pkg in PACKAGES for path in sorted((SRC / pkg).rglob("*.py")) for imp in imports_of(path)]


@pytest.mark.parametrize("rule", RULES, ids=[r.scope + ": " + r.why.split(":")[0] for r in RULES])
def test_import_rule(rule: Rule) -> None:
    bad = violations(rule, all_imports())
    assert not bad, f"{rule.scope}: {rule.why}\n  " + "\n  ".join(bad)


def test_the_scan_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function and a relative one are both found."""
    imports = [Import("kvmotion.cli.x", 3, "kvmotion.controller.auth"), Import("kvmotion.cli.x", 4, "kvmotion.models")]
    assert violations(RULES[0], imports) == ["kvmotion.cli.x (line 3) imports kvmotion.controller.auth"]
    assert _resolve("kvmotion.cli.main", False, 1, "client") == "kvmotion.cli.client"
    assert _resolve("kvmotion.cli", True, 2, "models") == "kvmotion.models"
    tree = ast.parse("def f():\n    from kvmotion.agent import qmp\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))


def test_every_rule_covers_modules() -> None:
    """A rule whose scope matches no module is a typo, not a rule."""
    names = {module_name(p) for pkg in PACKAGES for p in (SRC / pkg).rglob("*.py")}
    for rule in RULES:
        assert any(within(n, rule.scope) for n in names), f"rule for {rule.scope!r} matches no module"
