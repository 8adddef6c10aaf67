"""S2L proxy training and trajectory logging: resume after a crash, determinism, sharding, S3, Prefect tasks."""
from __future__ import annotations

import random
import string

import numpy as np
import pyarrow as pa
import pytest

from sftcurate.data_contracts import EXAMPLES, ContractError
from sftcurate.infra.hashing import fingerprint
from sftcurate.infra.store import ArtifactStore, is_committed, join, read_bytes, read_manifest
from sftcurate.core.config import ProxyConfig
from tests.helpers import examples_meta, progress_steps

TINY = "tiny-gpt2:n_layer=1,n_embd=32,n_head=2,vocab=300"


# ---------------------------------------------------------------- pool builders (also used by test_s2l)

def group_rows(n_repeat: int = 40, n_noise: int = 40, n_prose: int = 12, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, response, group) rows of three kinds a tiny proxy learns at very different speeds:
    one repeated word (learned fast), random letters (never learned), prose from the Python docs (slowly)."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    rows = [(f"say it {i}", " ".join(["alpha"] * (10 + i % 3)), "repeat") for i in range(n_repeat)]
    rows += [("noise", "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(60)), "noise")
             for _ in range(n_noise)]
    keys = sorted(topics)
    rows += [("", " ".join(topics[keys[3 * i]].split())[:240], "prose") for i in range(n_prose)]
    rng.shuffle(rows)
    return rows


def make_examples(rows, store_root: str | None = None) -> str:
    """Commit an examples artifact (contract EXAMPLES, all rows in the train split)."""
    ids = [fingerprint(p, r, i) for i, (p, r, _) in enumerate(rows)]
    table = pa.table({
        "id": ids, "prompt": [p for p, _, _ in rows], "response": [r for _, r, _ in rows],
        "source": [g for _, _, g in rows], "group": [g for _, _, g in rows], "turns": [""] * len(rows),
        "origin": ["t"] * len(rows),
        "format": ["prompt_response"] * len(rows), "raw": ["{}"] * len(rows),
        "prompt_tokens": np.array([len(p.split()) for p, _, _ in rows], dtype=np.int64),
        "response_tokens": np.array([len(r.split()) + 1 for _, r, _ in rows], dtype=np.int64),
        "split": ["train"] * len(rows),
    })
    writer = ArtifactStore(store_root).begin("examples", fingerprint(ids))
    writer.write_table("examples.parquet", table, EXAMPLES)
    writer.meta.update(examples_meta(fingerprint=fingerprint(ids), n_train=len(rows), n_examples=len(rows),
                                     records=len(rows),
                                     train_tokens=int(np.asarray(table.column("response_tokens")).sum())))
    return writer.commit()


def checkpoint_tensors(ckpt_uri: str) -> dict:
    from safetensors.numpy import load

    names = [n for n in read_manifest(ckpt_uri)["files"] if n.endswith(".safetensors")]
    return {f"{n}:{k}": v for n in names for k, v in load(read_bytes(join(ckpt_uri, n))).items()}


# ---------------------------------------------------------------- plain functions

def test_schedule_pieces_are_pure_functions():
    from sftcurate.core.proxy import ProxyError, checkpoint_steps, recipe
    from sftcurate.core.training import batch_schedule

    assert checkpoint_steps(200, 10) == list(range(20, 201, 20))
    assert checkpoint_steps(12, 4) == [3, 6, 9, 12]
    with pytest.raises(ProxyError, match="proxy.steps"):
        checkpoint_steps(5, 10)
    lrs = [recipe(ProxyConfig(steps=100, learning_rate=1e-3)).lr(s) for s in range(100)]
    assert lrs[4] == pytest.approx(1e-3) and lrs[0] < lrs[4]  # 5 warmup steps, then cosine down to 10%
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    lengths = np.random.default_rng(0).integers(3, 90, 103)
    a = batch_schedule(lengths, 8, 13 * 3, seed=1)  # 13 batches an epoch
    assert [x.tolist() for x in a] == [x.tolist() for x in batch_schedule(lengths, 8, 13 * 3, seed=1)]
    assert sorted(np.concatenate(a[13:26]).tolist()) == list(range(103))  # each epoch sees every example once
    assert [x.tolist() for x in a[13:26]] != [x.tolist() for x in a[26:]]


# ---------------------------------------------------------------- (b) resume after a crash

class Crash(RuntimeError):
    pass


def test_resume_after_crash_continues_from_last_checkpoint_and_matches_uninterrupted(tmp_path, monkeypatch):
    from sftcurate.core.proxy import ProxyCheckpoints, checkpoint_uri, proxy_checkpoints, train_proxy

    rows = group_rows(12, 12, 4)
    cfg = {"steps": 12, "checkpoints": 4, "learning_rate": 5e-3, "batch_size": 8, "seed": 3}
    root_a, root_b = str(tmp_path / "a"), str(tmp_path / "b")
    ex_a, ex_b = make_examples(rows, root_a), make_examples(rows, root_b)

    steps_a: list[int] = []
    with progress_steps(steps_a):
        proxy_a = train_proxy(ex_a, TINY, cfg, 64, store_root=root_a)
    assert steps_a == list(range(1, 13))

    save = ProxyCheckpoints.save

    def save_then_crash_at_6(self, step, model, optimizer, extra):
        uri = save(self, step, model, optimizer, extra)
        if step == 6:
            raise Crash(f"simulated crash after committing {uri}")
        return uri

    steps_b: list[int] = []
    monkeypatch.setattr(ProxyCheckpoints, "save", save_then_crash_at_6)
    with pytest.raises(Crash), progress_steps(steps_b):
        train_proxy(ex_b, TINY, cfg, 64, store_root=root_b)
    monkeypatch.setattr(ProxyCheckpoints, "save", save)
    uri_b = proxy_a.replace(root_a, root_b)
    assert not is_committed(uri_b)
    assert [is_committed(checkpoint_uri(uri_b, s)) for s in (3, 6, 9, 12)] == [True, True, False, False]
    assert steps_b == list(range(1, 7))

    steps_b.clear()
    with progress_steps(steps_b):
        proxy_b = train_proxy(ex_b, TINY, cfg, 64, store_root=root_b)
    assert proxy_b == uri_b
    assert steps_b == list(range(7, 13)), "steps 1-6 must not be retrained"
    meta = read_manifest(proxy_b)["meta"]
    assert meta["resumed_from_step"] == 6 and meta["trained_steps"] == 6

    ckpts_a, ckpts_b = proxy_checkpoints(proxy_a), proxy_checkpoints(proxy_b)
    assert [s for s, _ in ckpts_a] == [s for s, _ in ckpts_b] == [3, 6, 9, 12]
    for (_, ua), (_, ub) in zip(ckpts_a, ckpts_b):
        ta, tb = checkpoint_tensors(ua), checkpoint_tensors(ub)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    # a committed proxy is reused: nothing is trained again
    steps_b.clear()
    with progress_steps(steps_b):
        assert train_proxy(ex_b, TINY, cfg, 64, store_root=root_b) == proxy_b
    assert steps_b == []


def test_a_crash_before_the_first_checkpoint_keeps_the_committed_tokenizer_and_base(tmp_path, monkeypatch):
    """The rerun starts from step 0 but must not rewrite what the crashed attempt committed (found by the SIGKILL
    trials: the tokenizer and the LoRA base were aborted and written again), and trains to the same weights."""
    from sftcurate.core.proxy import ProxyCheckpoints, proxy_checkpoints, train_proxy

    rows = group_rows(6, 6, 2)
    cfg = {"steps": 4, "checkpoints": 2, "learning_rate": 1e-2, "batch_size": 4, "lora": True, "seed": 5}
    root_a, root_b = str(tmp_path / "a"), str(tmp_path / "b")
    ex_a, ex_b = make_examples(rows, root_a), make_examples(rows, root_b)
    proxy_a = train_proxy(ex_a, TINY, cfg, 64, store_root=root_a)

    def crash(self, step, model, optimizer, extra):
        raise Crash("killed before the first checkpoint")

    monkeypatch.setattr(ProxyCheckpoints, "save", crash)
    with pytest.raises(Crash):
        train_proxy(ex_b, TINY, cfg, 64, store_root=root_b)
    monkeypatch.undo()
    uri_b = proxy_a.replace(root_a, root_b)
    sub = {name: tmp_path / "b" / uri_b[len(root_b) + 1:] / name / "_MANIFEST.json" for name in ("tokenizer", "base")}
    before = {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in sub.items()}

    assert train_proxy(ex_b, TINY, cfg, 64, store_root=root_b) == uri_b
    assert {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in sub.items()} == before
    for (_, ua), (_, ub) in zip(proxy_checkpoints(proxy_a), proxy_checkpoints(uri_b)):
        ta, tb = checkpoint_tensors(ua), checkpoint_tensors(ub)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


# ---------------------------------------------------------------- trajectories

@pytest.fixture(scope="module")
def small_proxy(tmp_path_factory):
    from sftcurate.core.proxy import train_proxy

    root = str(tmp_path_factory.mktemp("traj"))
    rows = group_rows(10, 10, 5)
    ex = make_examples(rows, root)
    proxy = train_proxy(ex, TINY, {"steps": 8, "checkpoints": 2, "learning_rate": 1e-2, "batch_size": 8}, 64,
                        store_root=root)
    return root, ex, proxy, rows


def test_trajectories_batched_match_one_by_one_and_shards_join_in_pool_order(small_proxy):
    from sftcurate.core.ingest import load_pool
    from sftcurate.core.proxy import load_checkpoint_model, load_tokenizer, proxy_checkpoints
    from sftcurate.core.tokenize import example_rows
    from sftcurate.core.tokenize import encode_pairs
    from sftcurate.core.selectors.base import SelectorInputs
    from sftcurate.core.inputs import load_trajectories_file, load_trajectories_into as load_into
    from sftcurate.core.trajectories import (
        commit_trajectories, example_losses, example_losses_one_by_one, trajectory_shard,
    )

    root, ex, proxy, rows = small_proxy
    shards = [trajectory_shard(proxy, ex, i, 7, 256, store_root=root) for i in range(4)]  # 25 rows: 7+7+7+4
    uri = commit_trajectories(proxy, ex, shards, store_root=root)
    losses, steps, ids = load_trajectories_file(uri)
    assert losses.shape == (25, 2) and losses.dtype == np.float32 and steps.tolist() == [4, 8]
    pool = load_pool(ex)
    assert ids == pool.column("id").to_pylist()

    one_shard = trajectory_shard(proxy, ex, 0, 100, 4096, store_root=root)
    whole = commit_trajectories(proxy, ex, [one_shard], store_root=root)
    np.testing.assert_allclose(load_trajectories_file(whole)[0], losses, rtol=1e-5, atol=1e-5)

    tok = load_tokenizer(proxy)
    enc = encode_pairs(tok, example_rows(pool), 64)
    model = load_checkpoint_model(proxy, proxy_checkpoints(proxy)[-1][1], TINY, False)
    np.testing.assert_allclose(example_losses(model, enc, 128), example_losses_one_by_one(model, enc),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses[:, -1], example_losses_one_by_one(model, enc), rtol=1e-4, atol=1e-4)

    inputs = SelectorInputs(pool=pool, token_counts=np.ones(pool.num_rows, dtype=np.int64))
    load_into(uri, inputs)
    np.testing.assert_array_equal(inputs.trajectories[0], losses)
    shuffled = SelectorInputs(pool=pool.take(np.arange(pool.num_rows)[::-1]), token_counts=inputs.token_counts)
    with pytest.raises(ContractError, match="different pool"):
        load_into(uri, shuffled)
    meta = read_manifest(uri)["meta"]
    assert len(meta["mean_loss"]) == 2 and read_bytes(meta["summary_png"])[:4] == b"\x89PNG"


def test_lora_proxy_saves_adapters_and_trajectories_load_them(tmp_path):
    from sftcurate.core.proxy import proxy_checkpoints, train_proxy
    from sftcurate.core.trajectories import shard_losses

    root = str(tmp_path)
    ex = make_examples(group_rows(6, 6, 2), root)
    proxy = train_proxy(ex, TINY, {"steps": 4, "checkpoints": 2, "learning_rate": 1e-2, "batch_size": 4,
                                   "lora": True}, 64, store_root=root)
    files = read_manifest(proxy_checkpoints(proxy)[0][1])["files"]
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert is_committed(join(proxy, "base"))
    losses, steps = shard_losses(proxy, ex, 0, 100, 1024)
    assert losses.shape == (14, 2) and np.isfinite(losses).all()
    assert not np.allclose(losses[:, 0], losses[:, 1])


def test_proxy_and_trajectories_on_s3(s3_store):
    from sftcurate.core.proxy import train_proxy
    from sftcurate.core.trajectories import commit_trajectories, load_trajectories_file, trajectory_shard

    ex = make_examples(group_rows(5, 5, 2))
    proxy = train_proxy(ex, TINY, {"steps": 4, "checkpoints": 2, "batch_size": 4}, 64)
    assert proxy.startswith("s3://")
    uri = commit_trajectories(proxy, ex, [trajectory_shard(proxy, ex, 0, 100, 1024)])
    losses, steps, ids = load_trajectories_file(uri)
    assert uri.startswith("s3://") and losses.shape == (12, 2) and len(ids) == 12


def test_produce_runs_the_prefect_tasks_and_logs_to_mlflow(prefect_harness, store_root):
    from sftcurate.infra import tracking
    from sftcurate.core.config import CurateConfig
    from sftcurate.core.ingest import load_pool
    from sftcurate.core.selectors.base import SelectorInputs
    from sftcurate.core.inputs import load_trajectories_into as load_into
    from sftcurate.tasks.curate import produce

    ex = make_examples(group_rows(8, 8, 3))
    cfg = CurateConfig.model_validate({"models": {"proxy": TINY, "max_length": 64},
                                       "proxy": {"steps": 6, "checkpoints": 3, "batch_size": 8, "shard_size": 10}})
    with tracking.start_run("s2l-test") as run_id:
        uri = produce("trajectories", ex, cfg, run_id)
    meta = read_manifest(uri)["meta"]
    assert len(meta["shards"]) == 2 and meta["steps"] == [2, 4, 6]
    pool = load_pool(ex)
    inputs = SelectorInputs(pool=pool, token_counts=np.ones(pool.num_rows, dtype=np.int64))
    load_into(uri, inputs)
    assert inputs.trajectories[0].shape == (19, 3)
    history = tracking.client().get_metric_history(run_id, "proxy_loss")
    assert [m.step for m in history] == list(range(1, 7))
    assert len(tracking.client().get_metric_history(run_id, "trajectory_mean_loss")) == 3
    assert produce("trajectories", ex, cfg, None) == uri   # cached / content-addressed: same artifact
