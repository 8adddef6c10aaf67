"""The paper's synthetic experiment (small): FisherSFT below uniform on max and mean error; outputs written."""
from __future__ import annotations

import json

from sftcurate.core.synthetic import run_synthetic


def test_synthetic_fisher_beats_uniform(tmp_path):
    res = run_synthetic(tmp_path, runs=3, seed=0, n_grid=(20, 50, 100), log_to_mlflow=False, n_sentences=400)
    by = {(r["method"], r["n"]): r for r in res["rows"]}
    for n in (20, 50, 100):
        assert by[("fishersft", n)]["max_error"] < by[("uniform", n)]["max_error"]
        assert by[("fishersft", n)]["mean_error"] < by[("uniform", n)]["mean_error"]
    assert res["fisher_beats_uniform"]
    for name in ("synthetic.csv", "synthetic.md", "synthetic.png", "synthetic.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| 50 |" in (tmp_path / "synthetic.md").read_text()
    assert json.loads((tmp_path / "synthetic.json").read_text())["runs"] == 3


def test_synthetic_logs_to_mlflow(tmp_path):
    from sftcurate.infra import tracking

    res = run_synthetic(tmp_path, runs=1, seed=1, n_grid=(10, 20), n_sentences=100)
    run = tracking.client().get_run(res["run_id"])
    assert "fishersft.max_error" in run.data.metrics
    arts = [a.path for a in tracking.client().list_artifacts(res["run_id"], "synthetic")]
    assert {"synthetic/synthetic.png", "synthetic/synthetic.md", "synthetic/synthetic.csv"} <= set(arts)
