"""Every selector end to end through the curate flow (tiny models), and the same selectors from files
through `sftcurate select`, which must agree with the flow."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import join, read_table
from sftcurate.cli import app
from sftcurate.core.config import CurateConfig
from sftcurate.core.selection import load_selection

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


def config(method: str, **params) -> CurateConfig:
    return CurateConfig.model_validate({
        "name": f"flow-{method}", "source": {"uri": "builtin:python-docs", "limit": 90, "passage_chars": 400},
        "selection": {"method": method, "budget": 12, "seed": 1, "params": params},
        "models": {"target": "tiny-gpt2", "proxy": "tiny-gpt2", "max_length": 96},
        "proxy": {"steps": 24, "checkpoints": 4, "batch_size": 8},
    })


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
    import os

    from sftcurate.flows.curate import curate

    old = os.environ.get("SFTCURATE_STORE")
    os.environ["SFTCURATE_STORE"] = str(tmp_path_factory.mktemp("store"))
    try:
        yield {m: curate(config(m, **p)) for m, p in
               [("fishersft", {"lam": 1.0}), ("s2l", {"clusters": 4}), ("density", {}), ("askllm", {})]}
    finally:
        if old is None:
            os.environ.pop("SFTCURATE_STORE", None)
        else:
            os.environ["SFTCURATE_STORE"] = old


@pytest.mark.parametrize("method", ["fishersft", "s2l", "density", "askllm"])
def test_every_selector_runs_through_the_flow(flow_runs, method):
    summary = flow_runs[method]
    table, meta = load_selection(summary["selection_uri"])
    assert summary["selected"] == table.num_rows == 12 and meta["method"] == method
    assert len(set(table.column("index").to_pylist())) == 12
    assert summary["tokens_kept"] == sum(table.column("tokens").to_pylist())
    if method == "fishersft":
        gains = np.array(table.column("gain").to_pylist())
        assert (gains > 0).all() and meta["objective"] is not None
    if method == "s2l":
        assert None not in table.column("cluster").to_pylist()
    if method == "askllm":
        scores = table.column("score").to_pylist()
        assert scores == sorted(scores, reverse=True)  # top K by P(yes)


def test_select_cli_from_files_matches_the_flow(flow_runs, tmp_path):
    fisher_table, fisher_meta = load_selection(flow_runs["fishersft"]["selection_uri"])
    features = join(fisher_meta["inputs"]["token_features"], "features-00000.safetensors")
    out = tmp_path / "fisher.parquet"
    result = runner.invoke(app, ["select", "fishersft", "--features", features, "--budget", "12", "--lam", "1.0",
                                 "--algorithm", "naive", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from_cli = read_table(str(out), SELECTION)
    assert from_cli.column("index").to_pylist() == fisher_table.column("index").to_pylist()
    assert np.allclose(from_cli.column("gain").to_pylist(), fisher_table.column("gain").to_pylist(), rtol=1e-6)

    result = runner.invoke(app, ["select", "fishersft", "--features", features, "--token-budget", "500",
                                 "--out", str(tmp_path / "tok.parquet")])
    assert result.exit_code == 0, result.output
    assert sum(read_table(str(tmp_path / "tok.parquet"), SELECTION).column("tokens").to_pylist()) <= 500

    s2l_table, s2l_meta = load_selection(flow_runs["s2l"]["selection_uri"])
    trajectories = join(s2l_meta["inputs"]["trajectories"], "trajectories.safetensors")
    out = tmp_path / "s2l.parquet"
    result = runner.invoke(app, ["select", "s2l", "--trajectories", trajectories, "--budget", "12",
                                 "--clusters", "4", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(read_table(str(out), SELECTION).column("index").to_pylist()) == \
        sorted(s2l_table.column("index").to_pylist())


def test_select_cli_rejects_bad_features_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"features": np.ones((4, 3), np.float32), "offsets": np.array([0, 3, 2, 4], np.int64)}, str(bad))
    result = runner.invoke(app, ["select", "fishersft", "--features", str(bad), "--budget", "1",
                                 "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "not monotone" in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_reproduce_synthetic_cli(tmp_path):
    result = runner.invoke(app, ["reproduce", "synthetic", "--out", str(tmp_path / "syn"), "--runs", "2"])
    assert result.exit_code == 0, result.output
    written = {p.suffix for p in (tmp_path / "syn").iterdir()}
    assert {".png", ".csv", ".md"} <= written
