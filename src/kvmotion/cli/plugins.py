"""Command groups that other packages add to `kvmotion` (the lab's `lab`, `image`, `bench`, `demo`).

A package offers them through the ``kvmotion.cli`` entry-point group: a name and ``module:function``, the function
taking the Typer app. A source checkout run with PYTHONPATH has no installed entry points; the known plugins are
then tried by the same ``module:function`` strings, and one whose package is absent is left out.
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Callable

import typer

GROUP = "kvmotion.cli"
KNOWN: dict[str, str] = {"lab": "kvmotion_lab.cli:register"}


def discover() -> dict[str, EntryPoint]:
    """The plugins by name: the installed entry points, else the known ones (same strings)."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name, value in KNOWN.items():
        found.setdefault(name, EntryPoint(name=name, value=value, group=GROUP))
    return found


def load_plugins(app: typer.Typer) -> list[str]:
    """Register every plugin whose package is importable; returns the names registered."""
    loaded = []
    for name, ep in sorted(discover().items()):
        try:
            register: Callable[[typer.Typer], None] = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and ep.module.startswith(exc.name):    # the plugin's own package is not installed
                continue
            raise
        register(app)
        loaded.append(name)
    return loaded
