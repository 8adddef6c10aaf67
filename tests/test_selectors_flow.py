"""Every selector end to end through the curate flow (tiny models), and the same selectors from files
through `sftcurate select`, which must agree with the flow."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import join, read_manifest, read_table
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
    assert summary["selected"] == table.num_rows == 12 and meta.method == method
    assert len(set(table.column("index").to_pylist())) == 12
    assert summary["tokens_kept"] == sum(table.column("tokens").to_pylist())
    if method == "fishersft":
        gains = np.array(table.column("gain").to_pylist())
        assert (gains > 0).all() and meta.objective is not None
    if method == "s2l":
        assert None not in table.column("cluster").to_pylist()
    if method == "askllm":
        scores = table.column("score").to_pylist()
        assert scores == sorted(scores, reverse=True)  # top K by P(yes)


def test_select_cli_from_files_matches_the_flow(flow_runs, tmp_path):
    fisher_table, fisher_meta = load_selection(flow_runs["fishersft"]["selection_uri"])
    features = join(fisher_meta.inputs["token_features"], "features-00000.safetensors")
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
    trajectories = join(s2l_meta.inputs["trajectories"], "trajectories.safetensors")
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


@pytest.fixture
def plugin_selector():
    """The test-only selector `longest` and its input `response_chars` (tests/plugin_selector.py), registered for
    one test and removed after it."""
    from sftcurate.core.selectors.base import REGISTRY, REQUIREMENTS
    from tests import plugin_selector as plugin

    REGISTRY.setdefault("longest", plugin.LongestSelector)
    REQUIREMENTS.setdefault(plugin.RESPONSE_CHARS, plugin.RESPONSE_CHARS_INPUT)
    yield plugin
    REGISTRY.pop("longest")
    REQUIREMENTS.pop(plugin.RESPONSE_CHARS)


def test_a_selector_and_its_new_input_declared_in_one_module_reach_config_flow_and_cli(plugin_selector, tmp_path,
                                                                                         monkeypatch):
    from pydantic import TypeAdapter

    from sftcurate.core.config import method_type, selector_params_model
    from sftcurate.core.ingest import load_pool
    from sftcurate.core.selectors.base import REGISTRY
    from sftcurate.flows.curate import curate

    # the config's drop-down and params sections, derived from the registry
    assert "longest" in TypeAdapter(method_type(list(REGISTRY))).json_schema()["enum"]
    sections = selector_params_model(REGISTRY)
    assert sections.model_fields["longest"].annotation is plugin_selector.LongestParams
    assert sections.model_validate({"longest": {"min_chars": 3}}).of("longest").min_chars == 3

    # the curate flow makes its input (shards mapped as Prefect tasks) and the selection reads it
    monkeypatch.setenv("SFTCURATE_STORE", str(tmp_path / "store"))
    summary = curate(config("longest"))
    table, meta = load_selection(summary["selection_uri"])
    pool = load_pool(summary["examples_uri"])
    chars = np.array([len(r) for r in pool.column("response").to_pylist()])
    assert table.column("index").to_pylist() == list(np.lexsort((np.arange(len(chars)), -chars))[:12])
    assert set(meta.inputs) == {"response_chars"} and len(read_manifest(meta.inputs["response_chars"])
                                                               ["meta"]["ids"]) == pool.num_rows

    # the CLI's subcommand and its options, derived from the registry; its input read from a file
    listed = runner.invoke(app, ["select", "--help"])
    assert listed.exit_code == 0 and "longest" in listed.output and "Longest:" in listed.output
    helped = runner.invoke(app, ["select", "longest", "--help"])
    assert "--chars" in helped.output and "--min-chars" in helped.output
    lengths = tmp_path / "chars.npy"
    np.save(lengths, np.array([5, 50, 7, 90, 3]))
    out = tmp_path / "longest.parquet"
    result = runner.invoke(app, ["select", "longest", "--chars", str(lengths), "--budget", "3", "--min-chars", "6",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_table(str(out), SELECTION).column("index").to_pylist() == [3, 1, 2]


def test_the_config_form_and_the_cli_offer_every_registered_selector_and_parameter():
    from sftcurate.core.selectors.base import REGISTRY

    # the package's selectors (tests register their own selectors too, whatever order the suite runs in)
    built_in = [name for name, cls in REGISTRY.items() if cls.__module__.startswith("sftcurate.")]
    selection = CurateConfig.model_json_schema()["$defs"]["SelectionConfig"]["properties"]
    assert selection["method"]["enum"] == built_in
    sections = CurateConfig.model_fields["selection"].annotation.model_fields["params"].annotation.model_fields
    assert list(sections) == [name for name in built_in if REGISTRY[name].Params.model_fields]
    listed = runner.invoke(app, ["select", "--help"], terminal_width=200)
    assert all(name in listed.output for name in built_in), listed.output
    for name in built_in:
        helped = runner.invoke(app, ["select", name, "--help"], terminal_width=200)
        assert helped.exit_code == 0, helped.output
        for field in REGISTRY[name].Params.model_fields:  # s2l's own `seed` is the common --seed's name
            assert f"--{field.replace('_', '-')}" in helped.output, (name, field)
