"""The experiments' smoke run: every section measured on tiny models, through the project's own code paths."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.__main__ import main
from experiments.inference import Graphs, consecutive_batches
from experiments.plan import SMOKE, Plan
from models.data import load_splits

pytestmark = pytest.mark.slow  # trains and exports the experiments' smoke plan (make test-fast leaves it out)

SECTIONS = [
    "## The five norms",
    "## The models, over seeds",
    "## Inference batch size",
    "## Skewed batches",
    "## One sample, many companions",
    "## Padded tokens",
    "## Training batch size",
    "## EMA against precise statistics",
    "## Running statistics during training",
    "## The fold",
    "## Switchable Norm",
    "## The classic small example",
]


def _args(root: Path) -> list[str]:
    return [
        "--jobs",
        "1",
        "--out",
        str(root / "docs" / "batchnorm.md"),
        "--plots",
        str(root / "plots"),
        "--cache",
        str(root / "cache"),
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("experiments")
    assert main(["--smoke", *_args(root)]) == 0
    return root, json.loads((root / "cache" / "results.json").read_text())


def test_the_page_has_every_section_and_every_plot_it_links(smoke) -> None:
    root, _ = smoke
    page = (root / "docs" / "batchnorm.md").read_text()
    for heading in SECTIONS:
        assert heading in page
    assert "Smoke run" in page
    captions = json.loads((root / "plots" / "plots.json").read_text())
    assert len(captions) == 10
    for c in captions:
        assert (root / "plots" / c["file"]).stat().st_size > 5000  # a drawn PNG
        assert f"](../plots/{c['file']})" in page and c["caption"]


def test_figures_come_from_the_exported_graphs(smoke) -> None:
    root, results = smoke
    data = load_splits()
    x, y = np.array(data.x_test), np.array(data.y_test)
    sizes = results["inference_batch_size"]["sizes"]
    for name, runs in results["inference_batch_size"]["models"].items():
        for run, model in zip(runs, results["models"][name], strict=True):
            # Running statistics: one accuracy at every batch size, the one the exporter verified.
            assert run["running"] == [model["test_accuracy"]] * len(sizes)
    # The batch-statistics figure is what the served batch-statistics graph answers.
    graphs = Graphs(root / "cache" / "repository" / "cnn-bn" / "1")
    correct = sum(
        int((graphs.batch(x[rows]).argmax(1)[:new] == y[rows][:new]).sum())
        for rows, new in consecutive_batches(len(x), 2)
    )
    assert results["inference_batch_size"]["models"]["cnn-bn"][0]["batch"][1] == correct / len(x)


def test_batch_dependence_where_the_statistics_are_the_batchs_only(smoke) -> None:
    _, results = smoke
    for one in results["companions"].values():
        for curves in one["curves"].values():
            assert len(set(curves["running"])) == 1  # the companions never move the served answer
            assert len(set(curves["batch"])) > 1
    for run in results["padding"]["vit-ln"]:
        assert max(run["eval"]["max_logit_change"]) < 1e-5  # LayerNorm: padding changes nothing
    for run in results["padding"]["vit-bn"]:
        assert max(run["eval"]["max_logit_change"]) < 1e-5
        assert run["train"]["max_logit_change"][-1] > 1e-3  # batch statistics pool the padding


def test_axes_found_are_each_norms_own(smoke) -> None:
    _, results = smoke
    found = {a["model"]: a["reduces_over"] for a in results["axes"]}
    assert found["cnn-bn"] == "N, H, W" and found["cnn-in"] == "H, W" and found["cnn-ln"] == "C"
    assert found["cnn-gn"].startswith("C/G") and found["vit-bn"] == "B, T" and found["vit-ln"] == "D"
    assert all(a["error"] < 1e-4 < a["next_best_error"] for a in results["axes"])


def test_training_sections_cover_every_run_of_the_plan(smoke) -> None:
    _, results = smoke
    plan = Plan(SMOKE)
    assert len(results["train_batch_size"]) == sum(len(r) for r in plan.sweep_runs().values())
    assert all("test_precise" in row for row in results["train_batch_size"] if "-bn-" in row["name"])
    assert {row["momentum"] for row in results["momentum"]} == set(SMOKE.momenta)
    for seed in results["switchable"]:
        for layer in seed:
            assert sum(layer["mean"].values()) == pytest.approx(1.0) and sum(layer["var"].values()) == pytest.approx(
                1.0
            )
    for layer in results["running_stats"]["cnn-bn"]["layers"]:
        assert 10 * layer["var_rule_error_unbiased"] < layer["var_rule_error_biased"]
    assert len(results["mlp"]) == 3 * len(SMOKE.seeds)
    assert results["fold"]["channel"]["formula_error"] < 1e-5
    assert "BatchNormalization" in results["fold"]["ops"]["unfolded"]
    assert "BatchNormalization" not in results["fold"]["ops"]["served"]


def test_redraw_writes_the_page_again_from_the_saved_results_alone(smoke, capsys) -> None:
    root, _ = smoke
    page = root / "docs" / "batchnorm.md"
    before = page.read_text()
    page.unlink()
    assert main(["--redraw", *_args(root)]) == 0
    assert page.read_text() == before
    with pytest.raises(SystemExit):
        main(["--redraw", *_args(root / "elsewhere")])
    assert "run without --redraw first" in capsys.readouterr().err


def test_a_run_the_exporter_refuses_stops_the_experiments_with_its_reason(tmp_path, monkeypatch, capsys) -> None:
    import experiments.__main__ as cli
    from export.verify import Check, VerificationError

    def refuse(*args: object, **kwargs: object) -> None:
        raise VerificationError([Check("accuracy", False, "accuracy 90.00%, expected >= 97.00%")])

    monkeypatch.setattr(cli, "ensure", refuse)
    assert cli.main(["--smoke", *_args(tmp_path)]) == 1
    assert "error: export refused, 1 check(s) failed: accuracy: accuracy 90.00%" in capsys.readouterr().err
    assert not (tmp_path / "docs" / "batchnorm.md").exists()
