"""The demo page: ``GET /demo`` and the static files beside it (``service/static/demo/``).

The page is plain HTML, JavaScript and CSS that talk to this server's own API only: readiness,
model metadata, ``/infer`` and ``/batchnorm``. Its held-out digits come from ``digits.json``,
written by ``python -m models.data --write-demo-digits`` (the service has no scikit-learn). The
plots of ``make experiments`` (``plots/*.png`` and their captions, ``plots/plots.json``) are served
under ``/demo/plots/``; the page shows them where they exist.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

__all__ = ["DEMO_DIR", "router"]

DEMO_DIR = Path(__file__).resolve().parent.parent / "static" / "demo"

router = APIRouter(tags=["demo"])


# The page's files, fixed when the service starts: no path from a request is ever opened, and no
# dotfile, editor backup or link that lands in the folder later is served.
def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.suffix in suffixes
    }


_FILES = _files(DEMO_DIR, (".html", ".js", ".css", ".json"))
_PLOTS = _files(DEMO_DIR / "plots", (".png", ".json"))

# Read on every request, so an edited page shows on reload; the files are small.
_NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/demo", response_class=HTMLResponse, summary="The demo page: draw a digit, compare the models")
async def page() -> HTMLResponse:
    return HTMLResponse((DEMO_DIR / "index.html").read_text(encoding="utf-8"), headers=_NO_CACHE)


@router.get("/demo/{asset}", summary="A static file of the demo page", response_model=None)
async def asset(asset: str) -> Response:
    if asset not in _FILES:
        return JSONResponse({"error": f"no demo file {asset!r}; the page is /demo"}, status_code=404)
    return FileResponse(_FILES[asset], headers=_NO_CACHE)


@router.get("/demo/plots/{plot}", summary="A plot of the experiments (make experiments), or their captions")
async def plot(plot: str) -> Response:
    if plot not in _PLOTS:
        return JSONResponse(
            {"error": f"no plot {plot!r}; make experiments writes them, and the list is /demo/plots/plots.json"},
            status_code=404,
        )
    return FileResponse(_PLOTS[plot], headers=_NO_CACHE)
