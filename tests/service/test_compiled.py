"""The compiled request path: a module runs from its Cython build only while that build is current and loads,
and the service says which modules run compiled and why the others do not.

(The whole suite runs on the compiled modules: `make test` builds them first.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from service.compiled import MANIFEST, MODULES, OFF, Status, describe, digest

ROOT = Path(__file__).resolve().parents[2]
MODULE = "service.access"  # small: one module builds in seconds


def _compiler_missing() -> str | None:
    try:
        import Cython  # noqa: F401
    except ImportError:
        return "Cython is not installed (the `native` extra)"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return None if shutil.which(compiler) else f"no C compiler ({compiler})"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _compiler_missing()
    if reason:
        pytest.skip(reason)
    from service.compile import build

    directory = tmp_path_factory.mktemp("compiled")
    manifest = build(directory, modules=(MODULE,), jobs=1)
    assert set(manifest["modules"]) == {MODULE}
    return directory


def _imported(directory: Path, **env: str) -> dict[str, Any]:
    """Import the module in a fresh interpreter with ``directory`` as the build: where it came from, what
    the status says, and whether it works."""
    code = (
        "import json, service.compiled as c, service.access as a; "
        "ok = a.endpoint_group('/v2/models/m/infer'); "
        "print(json.dumps({'file': a.__file__, 'status': c.status().as_dict(), 'works': ok, 'line': c.describe()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "NORMSERVE_COMPILED_DIR": str(directory), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _copy(built: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path / "compiled"
    shutil.copytree(built, directory)
    return directory, json.loads((directory / MANIFEST).read_text())


def test_a_current_build_is_imported_in_place_of_its_source(built: Path, tmp_path: Path) -> None:
    got = _imported(built)
    assert Path(got["file"]).parent == built and got["file"].endswith(".so")
    assert got["status"]["compiled"] == [MODULE]
    assert got["status"]["from_source"] == {m: "not built (make compiled)" for m in MODULES if m != MODULE}
    assert got["works"] == "inference"  # the compiled module answers as its source does
    assert got["line"].startswith(f"1 of {len(MODULES)} request-path modules run compiled: not built")


def test_a_build_whose_source_changed_since_is_not_imported(built: Path, tmp_path: Path) -> None:
    directory, manifest = _copy(built, tmp_path)
    manifest["modules"][MODULE]["source_sha256"] = "0" * 64  # as if access.py had been edited after the build
    (directory / MANIFEST).write_text(json.dumps(manifest))
    got = _imported(directory)
    assert got["file"] == str(ROOT / "service" / "access.py")
    assert got["status"]["compiled"] == []
    assert got["status"]["from_source"][MODULE] == "its source changed since it was built (make compiled)"
    assert got["works"] == "inference"


def test_a_modules_cython_declarations_are_part_of_what_its_build_must_match(tmp_path: Path) -> None:
    # A class declared an extension type in the .pxd beside its module is built so: a build made before the
    # declarations changed is as stale as one made before the source did.
    source = tmp_path / "m.py"
    source.write_text("class A:\n    pass\n")
    alone = digest(source)
    assert alone == hashlib.sha256(source.read_bytes()).hexdigest()
    (tmp_path / "m.pxd").write_text("cdef class A:\n    cdef public object a\n")
    declared = digest(source)
    (tmp_path / "m.pxd").write_text("cdef class A:\n    cdef public object a, b\n")
    assert len({alone, declared, digest(source)}) == 3


def test_a_build_the_dynamic_loader_refuses_falls_back_to_the_source(built: Path, tmp_path: Path) -> None:
    directory, manifest = _copy(built, tmp_path)
    (directory / manifest["modules"][MODULE]["file"]).write_bytes(b"not an ELF file")
    got = _imported(directory)
    assert got["file"] == str(ROOT / "service" / "access.py")
    assert got["status"]["compiled"] == []
    assert got["status"]["from_source"][MODULE].startswith("its build would not load (")
    assert got["works"] == "inference"


def test_a_build_for_another_python_is_not_imported(built: Path, tmp_path: Path) -> None:
    directory, manifest = _copy(built, tmp_path)
    entry = manifest["modules"][MODULE]
    other = entry["file"].split(".cpython-")[0] + ".cpython-312-x86_64-linux-gnu.so"
    (directory / entry["file"]).rename(directory / other)
    entry["file"] = other
    (directory / MANIFEST).write_text(json.dumps(manifest))
    got = _imported(directory)
    assert got["file"] == str(ROOT / "service" / "access.py")
    assert got["status"]["from_source"][MODULE].startswith(f"built for another Python ({other}")


def test_normserve_compiled_0_imports_every_module_from_source(built: Path, tmp_path: Path) -> None:
    got = _imported(built, NORMSERVE_COMPILED="0")
    assert got["file"] == str(ROOT / "service" / "access.py")
    assert got["status"]["from_source"] == dict.fromkeys(MODULES, OFF)
    assert got["line"] == f"the request path runs from source: {OFF}"


def test_the_start_up_line_names_what_runs_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    every = Status(ROOT, cython="3.3.1", compiled=list(MODULES))
    monkeypatch.setattr("service.compiled._status", every)
    assert describe() == f"the request path runs compiled (Cython 3.3.1, {len(MODULES)} modules)"
    none = Status(ROOT, from_source=dict.fromkeys(MODULES, "not built (make compiled)"))
    monkeypatch.setattr("service.compiled._status", none)
    assert describe() == "the request path runs from source: not built (make compiled)"
