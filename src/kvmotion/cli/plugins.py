"""Command groups that other packages add to `kvmotion` (the lab's `lab`, `image`, `bench`, `demo`).

A package offers them through the ``kvmotion.cli`` entry-point group: a name and ``module:function``, the function
taking the Typer app. A source checkout run with PYTHONPATH has no installed entry points; the known plugins are
then tried by the same ``module:function`` strings, and one whose package is absent is left out.
"""
from __future__ import annotations

import copy
from importlib.metadata import EntryPoint, entry_points
from typing import Callable

import typer
import typer.models

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
        merge_groups(app)
        loaded.append(name)
    return loaded


def _command_name(c: typer.models.CommandInfo) -> str:
    return c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")


def merge_groups(app: typer.Typer) -> None:
    """Command groups registered twice under one name become one: the first (the product's) keeps its help and its
    commands, and gains the later ones' commands and subgroups whose names it lacks (the lab's `image build` joins
    the product's `image` group). The first group is copied, never changed in place: its module's Typer stays as
    defined, so building the app again gives the same result."""
    first: dict[str, int] = {}
    merged: list[typer.models.TyperInfo] = []
    for info in app.registered_groups:
        name = info.name or ""
        if name not in first or info.typer_instance is None:
            first[name] = len(merged)
            merged.append(info)
            continue
        keep = merged[first[name]]
        assert keep.typer_instance is not None
        union = copy.copy(keep.typer_instance)
        have = {_command_name(c) for c in keep.typer_instance.registered_commands}
        union.registered_commands = keep.typer_instance.registered_commands + [
            c for c in info.typer_instance.registered_commands if _command_name(c) not in have]
        groups = {g.name for g in keep.typer_instance.registered_groups}
        union.registered_groups = keep.typer_instance.registered_groups + [
            g for g in info.typer_instance.registered_groups if g.name not in groups]
        merged[first[name]] = copy.copy(keep)
        merged[first[name]].typer_instance = union
    app.registered_groups = merged
