"""Issue 24, the optional targets: S2L weights its clusters by where a target's trajectories fall and fills the
budget toward them, and is byte-identical without one; FisherSFT aims at `--target-features` when given;
`embedding.model` makes the token features from another model (another artifact); all of it typed, refused in one
line when unknown, and run through `sftcurate select` and the curate flow."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from sftcurate.cli import app
from sftcurate.core.config import CompareConfig, ConfigError, CurateConfig, load_config
from sftcurate.core.requirements import selection_requires
from sftcurate.core.selectors.base import Budget, SelectorParamError, get_selector
from sftcurate.core.selectors.s2l import _s2l_fill, fill_budget_by_clusters, fill_toward_target, target_weights
from sftcurate.core.target import TARGET_FEATURES, TARGET_TRAJECTORIES, TargetError
from sftcurate.core.target_records import feature_model
from sftcurate.data_contracts import SELECTION
from sftcurate.infra.store import read_manifest, read_table
from tests.test_s2l import inputs_for, synthetic_trajectories
from tests.test_targeted import planted_pool, selector_inputs

runner = CliRunner()


def digest(picks) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in picks]).encode()).hexdigest()[:16]


def test_without_a_target_s2l_picks_what_it_picked_before_targets_existed():
    """Digests of picks computed by the code before S2L could aim at a target (commit 1207715)."""
    rng = np.random.default_rng(11)
    labels, tokens = rng.integers(0, 9, 500), rng.integers(1, 300, 500)
    assert digest(fill_budget_by_clusters(labels, Budget(examples=77), 3, tokens)) == "76fa8d605fc90ef5"
    assert digest(fill_budget_by_clusters(labels, Budget(tokens=20000), 3, tokens)) == "b2d82dc22a4a5367"
    assert digest(fill_budget_by_clusters(labels, Budget(examples=40, tokens=9000), 5, tokens)) == "7d856874ded64033"
    strata = np.where(np.arange(500) % 3 == 0, "a", "b")
    assert digest(fill_budget_by_clusters(labels, Budget(examples=61), 2, tokens, strata)) == "0e9b2918cb1ee777"
    losses = rng.normal(size=(300, 6)).cumsum(1).astype(np.float32)
    inputs = inputs_for(losses, np.arange(1, 7), token_counts=tokens[:300])
    s2l = get_selector("s2l", dict(clusters=7))
    assert digest(s2l.select(inputs, Budget(examples=50), 4).indices) == "76c07202ee746213"
    assert digest(s2l.select(inputs, Budget(tokens=9000), 4).indices) == "c3ffff007113e0e6"
    assert "target_weights" not in s2l.select(inputs, Budget(examples=50), 4).info


def test_equal_weights_are_algorithm_1_and_weights_set_the_shares():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    tokens = rng.integers(1, 50, 300)
    members = [np.flatnonzero(labels == c) for c in range(6)]
    for budget in (Budget(examples=40), Budget(tokens=2000), Budget(examples=30, tokens=1500)):
        plain = _s2l_fill(members, budget, np.random.default_rng(5), tokens)
        assert plain == _s2l_fill(members, budget, np.random.default_rng(5), tokens, weights=[1] * 6)
    big = [np.arange(100), np.arange(100, 200), np.arange(200, 300)]
    picks = _s2l_fill(big, Budget(examples=60), np.random.default_rng(0), np.ones(300, np.int64), weights=[1, 2, 3])
    assert np.bincount(np.asarray(picks) // 100).tolist() == [10, 20, 30]


def test_target_clusters_get_the_budget_and_what_they_cannot_hold_flows_on():
    labels = np.repeat([0, 1, 2, 3], [50, 40, 6, 30])
    weights = np.array([0, 3, 1, 0])            # 3 target examples nearest cluster 1, 1 nearest cluster 2
    picks = fill_toward_target(labels, weights, Budget(examples=20), 0)
    assert len(picks) == len(set(picks)) == 20
    # cluster 2 (smallest) first: 20 * 1/4 = 5 of its 6; cluster 1 the 15 left
    assert np.bincount(labels[picks], minlength=4).tolist() == [0, 15, 5, 0]
    picks = fill_toward_target(labels, weights, Budget(examples=60), 0)   # target clusters hold 46: 14 flow on
    assert np.bincount(labels[picks], minlength=4).tolist()[1:3] == [40, 6] and len(set(picks)) == 60
    half = fill_toward_target(labels, weights, Budget(examples=20), 0, share=0.5)
    assert (weights[labels[half]] > 0).sum() >= 10 and len(half) == 20
    assert set(labels[half]) == {0, 1, 2, 3}      # the other half by Algorithm 1 over every cluster
    tokens = np.random.default_rng(1).integers(1, 40, len(labels))
    picks = fill_toward_target(labels, weights, Budget(tokens=600), 0, tokens)
    assert tokens[picks].sum() <= 600 and (weights[labels[picks]] > 0).all()
    assert target_weights(np.array([[0.0, 0.0], [5.0, 5.0], [4.9, 5.2]]),
                          np.array([[0.0, 0.1], [5.0, 5.0], [9.0, 9.0]])).tolist() == [1, 2, 0]


def test_s2l_with_a_target_in_one_cluster_picks_mostly_from_it():
    losses, steps, groups = synthetic_trajectories((300, 200, 40), seed=2)
    target, _, _ = synthetic_trajectories((0, 6, 0), seed=9)            # the slow group's curve, fresh noise
    inputs = inputs_for(losses, steps)
    inputs.extra[TARGET_TRAJECTORIES] = (target, steps)
    s2l = get_selector("s2l", dict(clusters=3))
    aimed = s2l.select(inputs, Budget(examples=30), 0)
    assert (groups[aimed.indices] == 1).mean() >= 0.9, groups[aimed.indices]
    assert aimed.info["target_examples"] == 6 and sum(aimed.info["target_weights"]) == 6
    assert aimed.info["picks_in_target_clusters"] == 30
    plain = get_selector("s2l", dict(clusters=3)).select(inputs_for(losses, steps), Budget(examples=30), 0)
    assert (groups[plain.indices] == 1).mean() <= 0.5                   # equal shares across the 3 clusters
    tokens = np.random.default_rng(0).integers(5, 60, len(groups))
    inputs_tok = inputs_for(losses, steps, token_counts=tokens)
    inputs_tok.extra[TARGET_TRAJECTORIES] = (target, steps)
    by_tokens = s2l.select(inputs_tok, Budget(tokens=1500), 0)
    assert tokens[by_tokens.indices].sum() <= 1500 and (groups[by_tokens.indices] == 1).mean() >= 0.9


def test_s2l_target_errors_are_one_line():
    losses, steps, _ = synthetic_trajectories((40, 30, 5))
    inputs = inputs_for(losses, steps, sources=["a", "b"] * 37 + ["a"])
    inputs.extra[TARGET_TRAJECTORIES] = (losses[:3, :5], steps[:5])
    with pytest.raises(TargetError, match=r"target's trajectories are at steps \[1, 2, 3, 4, 5\] but the pool's"):
        get_selector("s2l", dict(clusters=3)).select(inputs, Budget(examples=5), 0)
    inputs.extra[TARGET_TRAJECTORIES] = (losses[:3], steps)
    with pytest.raises(SelectorParamError, match=r"^params\.s2l\.stratify: a target decides"):
        get_selector("s2l", dict(clusters=3, stratify=True)).select(inputs, Budget(examples=5), 0)
    with pytest.raises(ConfigError, match=r"selection\.params\.s2l\.target_shar"):
        load_config(None, ["selection.method=s2l", "selection.params.s2l.target_shar=0.5"])
    with pytest.raises(ConfigError, match=r"selection\.params\.s2l\.target_share"):
        load_config(None, ["selection.method=s2l", "selection.params.s2l.target_share=1.5"])
    with pytest.raises(ConfigError, match=r"embedding\.modl"):
        load_config(None, ["embedding.modl=proxy"])


def test_which_requirements_a_run_makes_and_which_model_embeds():
    def run(method, target=None, **more):
        overrides = [f"selection.method={method}"] + ([f"selection.target={target}"] if target else [])
        return load_config(None, overrides + [f"{k}={v}" for k, v in more.items()])

    assert selection_requires(run("s2l").selection) == ("examples", "trajectories")
    assert selection_requires(run("s2l", "t.jsonl").selection) == ("examples", "trajectories", TARGET_TRAJECTORIES)
    assert selection_requires(run("fishersft", "t.jsonl").selection) == ("examples", TARGET_FEATURES,
                                                                          "token_features")
    assert selection_requires(run("similarity", "t.jsonl").selection)[1] == TARGET_FEATURES
    with pytest.raises(ConfigError, match=r"'uniform' does not aim at a target; choose one that does \(fishersft, "
                       r"s2l, similarity, fishersft_target\)"):
        run("uniform", "t.jsonl")
    cfg = run("fishersft", **{"models.target": "tiny-gpt2", "models.proxy": "tiny-gpt2:n_embd=32"})
    assert feature_model(cfg) == "tiny-gpt2"
    assert feature_model(cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"model": "proxy"})})) \
        == "tiny-gpt2:n_embd=32"
    assert feature_model(run("fishersft", **{"embedding.model": "gguf:/m.gguf"})) == "gguf:/m.gguf"
    # a comparison's cells: only the methods that need a target get it (s2l, fishersft stay untargeted)
    cmp = CompareConfig.model_validate({"methods": ["s2l", "fishersft", "similarity"], "budgets": [4],
                                        "target": "t.jsonl"})
    assert [cmp.aimed(m) for m in ("s2l", "fishersft", "similarity")] == [None, None, "t.jsonl"]


def test_fishersft_aims_at_a_target_when_one_is_loaded():
    features, offsets, group, target, target_offsets = planted_pool()
    inputs = selector_inputs(features, offsets, target, target_offsets)
    aimed = get_selector("fishersft").select(inputs, Budget(examples=10), seed=0)
    same = get_selector("fishersft_target").select(inputs, Budget(examples=10), seed=0)
    assert aimed.indices == same.indices and aimed.info["target"] is True
    assert group[aimed.indices[:5]].all() and group[aimed.indices].mean() >= 0.8
    with pytest.raises(SelectorParamError, match=r"^params\.fishersft\.whiten: transforms the pool's features only"):
        get_selector("fishersft", {"whiten": True}).select(inputs, Budget(examples=3), seed=0)
    del inputs.extra[TARGET_FEATURES]
    plain = get_selector("fishersft").select(inputs, Budget(examples=10), seed=0)
    assert "target" not in plain.info and group[plain.indices].mean() <= 0.5


def test_select_cli_fishersft_and_s2l_aim_at_target_files(tmp_path):
    features, offsets, group, target, target_offsets = planted_pool(seed=1)
    pool_file, target_file = tmp_path / "pool.safetensors", tmp_path / "target.safetensors"
    save_file({"features": features, "offsets": offsets}, str(pool_file))
    save_file({"features": target, "offsets": target_offsets}, str(target_file))
    out = tmp_path / "fishersft.parquet"
    result = runner.invoke(app, ["select", "fishersft", "--features", str(pool_file), "--target-features",
                                 str(target_file), "--budget", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    picks = read_table(str(out), SELECTION).column("index").to_pylist()
    assert group[picks[:5]].all() and group[picks].mean() >= 0.8, picks
    result = runner.invoke(app, ["select", "fishersft", "--features", str(pool_file), "--budget", "10",
                                 "--out", str(out)])
    assert result.exit_code == 0 and group[read_table(str(out), SELECTION).column("index").to_pylist()].mean() < 0.5

    losses, steps, groups = synthetic_trajectories((300, 200, 40), seed=2)
    aimed, _, _ = synthetic_trajectories((0, 6, 0), seed=9)
    np.save(tmp_path / "pool.npy", losses)
    np.save(tmp_path / "target.npy", aimed)
    out = tmp_path / "s2l.parquet"
    result = runner.invoke(app, ["select", "s2l", "--trajectories", str(tmp_path / "pool.npy"),
                                 "--target-trajectories", str(tmp_path / "target.npy"), "--clusters", "3",
                                 "--target-share", "1.0", "--budget", "30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (groups[read_table(str(out), SELECTION).column("index").to_pylist()] == 1).mean() >= 0.9
    missing = runner.invoke(app, ["select", "s2l", "--trajectories", str(tmp_path / "pool.npy"),
                                  "--target-trajectories", str(tmp_path / "nope.npy"), "--budget", "3",
                                  "--out", str(out)])
    assert missing.exit_code == 2 and "nope.npy" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.usefixtures("prefect_harness")
def test_curate_flow_aims_s2l_at_a_target_and_embeds_with_the_proxy(store_root, tmp_path):
    from sftcurate.core.ingest import load_pool
    from sftcurate.core.selection import selection_meta
    from sftcurate.flows.curate import curate
    from tests.helpers import write_jsonl
    from tests.test_proxy import TINY, group_rows

    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": p, "response": r} for p, r, _ in group_rows(40, 40, 12)])
    target = write_jsonl(tmp_path / "target.jsonl", [{"prompt": f"say it again {i}", "response": " ".join(
        ["alpha"] * (11 + i % 2))} for i in range(5)])                  # the fast-learned group's kind
    base = {"source": {"uri": str(pool), "heldout_fraction": 0.0}, "models": {"target": "tiny-gpt2", "proxy": TINY,
            "max_length": 128}, "proxy": {"steps": 24, "checkpoints": 4, "learning_rate": 1e-2, "batch_size": 16}}
    summary = curate(CurateConfig.model_validate({**base, "name": "aimed-s2l", "selection": {
        "method": "s2l", "budget": 10, "target": str(target), "params": {"clusters": 3}}}))
    meta = selection_meta(summary["selection_uri"])
    assert TARGET_TRAJECTORIES in meta.inputs and meta.info["target_examples"] == 5
    responses = dict(zip(*(load_pool(summary["examples_uri"]).column(c).to_pylist() for c in ("id", "response"))))
    picked = read_table(summary["selection_uri"] + "/selection.parquet", SELECTION).column("id").to_pylist()
    assert sum(responses[i].startswith("alpha") for i in picked) >= 8, [responses[i][:20] for i in picked]
    target_traj = read_manifest(meta.inputs[TARGET_TRAJECTORIES])["meta"]
    assert target_traj["n_examples"] == 5
    assert target_traj["proxy_uri"] == read_manifest(meta.inputs["trajectories"])["meta"]["proxy_uri"]

    summary = curate(CurateConfig.model_validate({**base, "name": "proxy-features", "embedding": {"model": "proxy"},
                                                  "selection": {"method": "fishersft", "budget": 4,
                                                                "target": str(target)}}))
    meta = selection_meta(summary["selection_uri"])
    pool_features = read_manifest(meta.inputs["token_features"])["meta"]
    target_features = read_manifest(meta.inputs[TARGET_FEATURES])["meta"]
    assert pool_features["model"] == target_features["model"] == TINY and pool_features["d"] == 32
    assert meta.info["target"] is True and meta.objective < meta.info["initial_variance"]
