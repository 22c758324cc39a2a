"""Sphinx extension: the API reference of every public vmpilot name, from the code itself.

``.. vmpilot-api:: vmpilot.qmp`` documents each name that module exports (its ``__all__``;
without one, the public classes, functions and UPPER_CASE constants defined in it) with
autodoc. A name exported by several modules (``vmpilot.Machine`` is
``vmpilot.machine.Machine``; every error lives in ``vmpilot.errors``) is documented once, in
its home: the first module of ``MODULES`` that exports it; the others link to it. So the
reference cannot miss a name (a new export appears by itself) and never documents one twice
(which Sphinx would report as a duplicate, an error under ``-W``).
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# Order matters: a name is documented in the first module that exports it.
MODULES = (
    "vmpilot.errors",
    "vmpilot.qmp",
    "vmpilot.qmp.mux",
    "vmpilot.machine",
    "vmpilot.machine.jobs",
    "vmpilot.machine.migration",
    "vmpilot.machine.snapshots",
    "vmpilot.console",
    "vmpilot.shell",
    "vmpilot.qga",
    "vmpilot.qtest",
    "vmpilot.guest",
    "vmpilot",
)


# Modules without ``__all__`` whose other top-level names are their machinery, not for
# users: the names the reference shows (what a Machine's methods return or default to).
CHOSEN = {
    "vmpilot.qmp.mux": ("QMPServer", "serve", "MAX_MESSAGE", "MAX_BACKLOG"),
    "vmpilot.machine.jobs": ("Job", "JOB_TIMEOUT", "CANCEL_TIMEOUT", "PROGRESS_INTERVAL"),
    "vmpilot.machine.migration": ("MigrationResult", "MIGRATE_TIMEOUT", "FD_NAME"),
    "vmpilot.machine.snapshots": ("SNAPSHOT_TIMEOUT", "STATE_NODE"),
}


def public_names(module: ModuleType) -> list[str]:
    """What `module` exports: the names ``CHOSEN`` for it, its ``__all__``, else what it
    defines without a leading ``_``."""
    if module.__name__ in CHOSEN:
        return list(CHOSEN[module.__name__])
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return [n for n in declared if n != "__version__"]
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        defined_here = getattr(obj, "__module__", None) == module.__name__
        constant = name.isupper() and isinstance(obj, (int, float, str, bytes))
        if (defined_here and (inspect.isclass(obj) or inspect.isfunction(obj))) or constant:
            names.append(name)
    return names


def home_of() -> dict[int, str]:
    """Each exported object's id → the module that documents it."""
    homes: dict[int, str] = {}
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in sorted(public_names(module), key=lambda n: reading_order(module, n)):
            obj = getattr(module, name)
            if isinstance(obj, (int, float, str, bytes)):
                continue  # equal constants in two modules are two names, not one object
            homes.setdefault(id(obj), modname)
    return homes


def directive_for(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "automodule"
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isfunction(obj):
        return "autofunction"
    return "autodata"


def summary(obj: Any) -> str:
    """The first paragraph of `obj`'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def reading_order(module: ModuleType, name: str) -> tuple[int, str, bool]:
    """The faces first (a class with an ``Async`` twin, then the twin), then the other
    classes and functions, then constants and aliases, submodules last."""
    obj = getattr(module, name)
    base = name.removeprefix("Async")
    if inspect.ismodule(obj):
        group = 3
    elif inspect.isclass(obj) and hasattr(module, "Async" + base) and hasattr(module, base):
        group = 0
    else:
        group = 1 if callable(obj) else 2
    return group, base, name.startswith("Async")


def has_private_ancestor(cls: type) -> bool:
    """Whether `cls` inherits public members from a class the reference does not show
    (a base in a ``_private`` module, or with a ``_private`` name)."""
    return any(
        base.__name__.startswith("_") or "._" in base.__module__
        for base in cls.__mro__[1:]
        if base is not object
    )


class VmpilotApi(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        homes = home_of()
        lines = [f".. automodule:: {modname}", "   :no-members:", ""]
        elsewhere = []
        for name in sorted(public_names(module), key=lambda n: reading_order(module, n)):
            obj = getattr(module, name)
            home = homes.get(id(obj), modname)
            if home != modname:
                elsewhere.append(f"- :py:obj:`{name} <{home}.{name}>` ({home}): {summary(obj)}")
                continue
            kind = directive_for(obj)
            lines.append(f".. {kind}:: {modname}.{name}")
            if kind in ("autoclass", "autoexception", "automodule"):
                lines.append("   :members:")
            if kind == "autoexception":
                lines.append("   :show-inheritance:")  # the error tree is part of the API
            if kind == "autoclass" and has_private_ancestor(obj):
                lines.append("   :inherited-members:")  # e.g. Machine's state, pid, log
            lines.append("")
        if elsewhere:
            lines += ["", f".. rubric:: Exported by ``{modname}``, documented in their modules", ""]
            lines += [*elsewhere, ""]
        content = StringList(lines, source=f"<vmpilot-api {modname}>")
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, content, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("vmpilot-api", VmpilotApi)
    return {"parallel_read_safe": True, "version": "1"}
