"""Compile the request path with Cython (service/compiled.py says what runs it and when).

    python -m service.compile                 # make compiled: every module in service.compiled.MODULES
    python -m service.compile --if-possible   # where Cython or a C compiler is missing, say so and exit 0
    python -m service.compile --if-stale      # only where a module's build is missing or older than its source
    python -m service.compile --status        # which modules run compiled, and why the others do not, as JSON

Needs Cython (the `native` extra), setuptools and a C compiler with Python's headers. About a minute on
two cores; the builds and their manifest replace ``service/_compiled/`` whole.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.compiled import DIRECTORY, MANIFEST, MODULES, OFF, digest, source_of, status

__all__ = ["DIRECTIVES", "build", "main"]

# Where Cython's semantics differ from Python's, Python's: annotations stay annotations (a ``float`` one
# would otherwise turn an int into a C double), and functions keep their introspection.
DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}


def build(directory: Path = DIRECTORY, modules: tuple[str, ...] = MODULES, jobs: int | None = None) -> dict[str, Any]:
    """Compile ``modules`` into ``directory`` with the SHA-256 of each one's source; returns the manifest."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    cython_version = importlib.metadata.version("cython")
    jobs = jobs or os.cpu_count() or 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normserve-compile-") as tmp:
        print(f"cythonizing {len(modules)} modules with Cython {cython_version}", flush=True)
        extensions = cythonize(  # type: ignore[no-untyped-call]
            [Extension(name, [str(source_of(name))]) for name in modules],
            build_dir=tmp,
            compiler_directives=DIRECTIVES,
            nthreads=jobs,
            quiet=True,
        )
        print(f"compiling them, {jobs} at a time ({time.perf_counter() - started:.0f} s so far)", flush=True)
        command = build_ext(Distribution({"ext_modules": extensions}))
        command.build_lib, command.build_temp, command.parallel = f"{tmp}/lib", f"{tmp}/temp", jobs
        command.ensure_finalized()
        command.run()
        staged = Path(tmp) / "staged"
        staged.mkdir()
        manifest: dict[str, Any] = {"cython": cython_version, "modules": {}}
        for name in modules:
            built = Path(command.get_ext_fullpath(name))
            file = name + built.name[built.name.index(".") :]  # service.transport.cpython-311-x86_64-linux-gnu.so
            shutil.copy2(built, staged / file)
            manifest["modules"][name] = {"file": file, "source_sha256": digest(source_of(name))}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        # The whole directory at once: never a manifest beside builds it does not describe.
        if directory.exists():
            shutil.rmtree(directory)
        shutil.copytree(staged, directory)
    print(f"built {len(modules)} modules into {directory} in {time.perf_counter() - started:.0f} s", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--directory", type=Path, default=DIRECTORY, help=f"default: {DIRECTORY}")
    parser.add_argument("--jobs", type=int, default=None, help="compilers at once (default: one per core)")
    parser.add_argument(
        "--if-possible",
        action="store_true",
        help="where Cython or a C compiler is missing, say so and exit 0: the service then runs from source",
    )
    parser.add_argument(
        "--if-stale", action="store_true", help="only where a module does not run compiled for want of a build"
    )
    parser.add_argument("--status", action="store_true", help="print which modules run compiled, and exit")
    args = parser.parse_args(argv)
    found = status()
    if args.status:
        print(json.dumps(found.as_dict(), indent=1))
        return 0
    if args.if_stale and args.directory == found.directory:
        if found.from_source and set(found.from_source.values()) == {OFF}:
            print(f"not compiling the request path: {OFF}")
            return 0
        if not found.from_source:
            print(f"the request path is compiled and current ({found.directory})")
            return 0
    try:
        build(args.directory, jobs=args.jobs)
    except Exception as e:  # Cython missing, no compiler, no Python headers: the source still runs
        if not args.if_possible:
            raise
        print(f"could not compile the request path ({type(e).__name__}: {e}); normserve runs it from source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
