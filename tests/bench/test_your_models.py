"""The table of docs/your-model.md: one ONNX file and one PyTorch module measured as the doc's command does."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.your_models import BEGIN, END, EXAMPLES, main, measure, table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the examples load as examples/<file>.py, as the doc's command runs them


@pytest.mark.usefixtures("at_root")
def test_each_row_reports_the_fold_parity_and_both_latencies() -> None:
    by_name = {e.name: e for e in EXAMPLES}
    rows = [measure(by_name[name], seconds=0.05) for name in ("convnet-bn-onnx", "tabular-mlp")]
    onnx_row, tabular = rows
    assert (onnx_row["folded"], onnx_row["folded_forward"], onnx_row["affine"]) == (4, 0, 1)
    assert onnx_row["fold_path"] == "onnx" and onnx_row["batchnorm_nodes_unfolded"] == 5
    assert (tabular["folded"], tabular["folded_forward"], tabular["affine"]) == (3, 1, 0)
    for row in rows:
        assert row["parity_of_tolerance"] < 1
        assert set(row["ms"]) == {"folded", "unfolded", "unfolded, optimizations off"}
        assert all(ms > 0 for variant in row["ms"].values() for ms in variant.values())
    text = table(rows)
    assert (
        text.count("\n") == 3 and "| tabular-mlp | tabular MLP, BatchNorm1d | `features:FP32:20` | 3 / 1 / 0 |" in text
    )


def test_write_replaces_only_the_table_between_the_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "your-model.md"
    doc.write_text(f"# before\n{BEGIN}\nold table\n{END}\nafter\n")
    monkeypatch.setattr("bench.your_models.DOC", doc)
    monkeypatch.setattr("bench.your_models.ROOT", ROOT)
    assert main(["--only", "convnet-bn-onnx", "--seconds", "0.02", "--write"]) == 0
    text = doc.read_text()
    assert text.startswith(f"# before\n{BEGIN}\n| model |") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and "| convnet-bn-onnx |" in text
