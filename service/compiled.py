"""The request path compiled with Cython: the same Python modules, run as C extensions where they were built.

    python -m service.compile            # make compiled: builds them (service/compile.py)
    python -m service.compile --status   # which modules run compiled, and why the others do not

Cython compiles these modules unchanged, so they behave as their source does (the whole test suite runs
on them), for about a fifth less of the interpreter's time per request. Where a module has Cython's
declarations beside it (``transport.pxd``, say), the classes they name are built as extension types: their
attributes are struct fields that compiled code reads directly, where a Python class's go through the type's
and the instance's dictionaries on every access; from source they are the same classes, as Python ones
(an extension type takes no attribute it does not declare, so each declares every attribute its class
sets). A dependency's module is compiled from the source installed, and checked against it in the same
way. Python would import an extension module in place of the source beside it, whatever that source says
by now; so the built modules live apart, in ``service/_compiled/``, with the SHA-256 of the source (and
declarations) each was built from (``manifest.json``), and ``service`` imports a module from there only
while its source is unchanged and the module loads. Anything else, a module edited since, built for
another Python, not built or refused by the dynamic loader, is imported from its source, and the start-up
log says which and why. ``NORMSERVE_COMPILED=0`` imports every module from source.
``NORMSERVE_COMPILED_DIR`` names another build directory.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["DIRECTORY", "MANIFEST", "MODULES", "OFF", "Status", "describe", "digest", "install", "source_of", "status"]

PACKAGE = Path(__file__).resolve().parent
DIRECTORY = PACKAGE / "_compiled"
MANIFEST = "manifest.json"
OFF = "NORMSERVE_COMPILED=0"

# What a request runs through between its bytes and its answer: the connection, the inference call, the
# document's checks and tensors, the body budget, admission and the queue, the batcher, the metrics and the
# registry's lookups; and of the pinned dependencies, the pure-Python parts of the same path: uvicorn's HTTP
# protocol (the base of the connection's) and prometheus_client's metrics. Not the FastAPI routes elsewhere,
# whose signatures and annotations FastAPI reads at start-up.
MODULES = (
    "service.transport",
    "service.routes.inference",
    "service.protocol",
    "service.batcher",
    "service.intake",
    "service.metrics",
    "service.registry",
    "service.access",
    "service.bodies",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.flow_control",
    "prometheus_client.metrics",
    "prometheus_client.values",
)


def source_of(module: str) -> Path:
    """The file a module's source is in, found without importing it or its package."""
    top, *rest = module.split(".")
    if top == "service":
        root = PACKAGE
    else:  # a dependency's: its package's folder (importing a package may import the module itself)
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"{top} is not installed as a package, so {module} cannot be compiled")
        root = Path(spec.submodule_search_locations[0])
    return root.joinpath(*rest).with_suffix(".py")


def digest(path: Path) -> str:
    """The SHA-256 of a module's source, and of Cython's declarations for it (the .pxd beside it), if any:
    a build is current only while both are as they were built."""
    sha = hashlib.sha256(path.read_bytes())
    if (declarations := path.with_suffix(".pxd")).exists():
        sha.update(declarations.read_bytes())
    return sha.hexdigest()


@dataclass
class Status:
    """Which modules run compiled, and for each of the others why it runs from source."""

    directory: Path
    cython: str | None = None
    compiled: list[str] = field(default_factory=list)
    from_source: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "cython": self.cython,
            "compiled": self.compiled,
            "from_source": self.from_source,
        }


_status: Status | None = None


def status() -> Status:
    """What :func:`install` found (it runs when ``service`` is imported)."""
    return _status if _status is not None else install()


def describe() -> str:
    """One line for the start-up log."""
    s = status()
    if len(s.compiled) == len(MODULES):
        return f"the request path runs compiled (Cython {s.cython}, {len(MODULES)} modules)"
    reasons = sorted(set(s.from_source.values()))
    head = (
        f"{len(s.compiled)} of {len(MODULES)} request-path modules run compiled"
        if s.compiled
        else ("the request path runs from source")
    )
    return f"{head}: {'; '.join(reasons)}"


class _Loader(importlib.abc.Loader):
    """A built module, or its source if the dynamic loader refuses the build (another libc, another ABI)."""

    def __init__(self, name: str, built: Path, report: Status) -> None:
        self.name, self.report = name, report
        self.built = importlib.machinery.ExtensionFileLoader(name, str(built))
        self.fallback: importlib.machinery.SourceFileLoader | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        try:
            return self.built.create_module(spec)
        except ImportError as e:
            self.report.compiled.remove(self.name)
            self.report.from_source[self.name] = f"its build would not load ({e})"
            self.fallback = importlib.machinery.SourceFileLoader(self.name, str(source_of(self.name)))
            return None

    def exec_module(self, module: ModuleType) -> None:
        if self.fallback is None:
            self.built.exec_module(module)
            return
        module.__file__ = self.fallback.path
        self.fallback.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, built: dict[str, Path], report: Status) -> None:
        self.built, self.report = built, report

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        file = self.built.get(name)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(name, file, loader=_Loader(name, file, self.report))


def install() -> Status:
    """Import each request-path module from its build where the build is current; say why not where not.

    Runs once, when ``service`` is imported, before any of those modules is."""
    global _status
    directory = Path(os.environ.get("NORMSERVE_COMPILED_DIR") or DIRECTORY)
    report = _status = Status(directory)
    if os.environ.get("NORMSERVE_COMPILED", "1") == "0":
        report.from_source = dict.fromkeys(MODULES, OFF)
        return report
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        report.from_source = dict.fromkeys(MODULES, "not built (make compiled)")
        return report
    except (OSError, ValueError) as e:
        report.from_source = dict.fromkeys(MODULES, f"{directory / MANIFEST} is unreadable ({e})")
        return report
    report.cython = manifest.get("cython")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built: dict[str, Path] = {}
    for name in MODULES:
        entry = manifest.get("modules", {}).get(name)
        if entry is None:
            report.from_source[name] = "not built (make compiled)"
        elif not entry["file"].endswith(suffix):
            report.from_source[name] = f"built for another Python ({entry['file']}, this one loads *{suffix})"
        elif not (directory / entry["file"]).is_file():
            report.from_source[name] = f"its build {entry['file']} is missing (make compiled)"
        elif digest(source_of(name)) != entry["source_sha256"]:
            report.from_source[name] = "its source changed since it was built (make compiled)"
        else:
            built[name] = directory / entry["file"]
            report.compiled.append(name)
    if built:
        sys.meta_path.insert(0, _Finder(built, report))
    return report
