"""Embedding stage: the feature is the pre-logit state, batched == one-by-one, shards/artifacts, bad files."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sftcurate.data_contracts import EXAMPLES, ContractError
from sftcurate.infra.models import model_fingerprint, resolve_model
from sftcurate.infra.store import ArtifactStore
from sftcurate.core.embedding import (commit_features, embed_examples, embed_one_by_one, embed_shard, fit_projection,
                                      pca_projection, random_projection)
from sftcurate.core.inputs import (load_features_file, load_sentence_embeddings_into, mean_pool,
                                   load_token_features_into as load_into)
from sftcurate.core.selectors import SelectorInputs
from sftcurate.core.tokenize import encode_example
from tests.helpers import examples_meta

EXAMPLES_QA = [("What is a list?", "A mutable sequence of items."), ("", "Plain text passage without a prompt."),
               ("Explain dicts " * 6, "Dicts map keys to values " * 5), ("Q", "A"),
               ("How do loops work in Python?", "for x in items: print(x)  # iterates " * 3)] * 3




@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny-gpt2")


def test_feature_is_pre_logit_state(tiny):
    p, r = EXAMPLES_QA[0]
    feats, offsets = next(embed_examples(tiny.model, tiny.tokenizer, [(p, r)], 128, 512, "float32", "cpu"))
    e = encode_example(tiny.tokenizer, p, r, 128)
    with torch.inference_mode():
        logits = tiny.model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
    sel = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
    assert feats.shape == (e.n_loss, tiny.model.config.hidden_size) and offsets.tolist() == [0, e.n_loss]
    head = tiny.model.get_output_embeddings()
    with torch.inference_mode():
        assert torch.allclose(head(torch.from_numpy(feats)), logits[sel], atol=1e-4)


def test_batched_equals_one_by_one_and_shards(tiny):
    ref_f, ref_o = embed_one_by_one(tiny.model, tiny.tokenizer, EXAMPLES_QA, 48)
    shards = list(embed_examples(tiny.model, tiny.tokenizer, EXAMPLES_QA, 48, 256, "float32", "cpu", shard_size=4))
    assert len(shards) == 4 and all(len(o) - 1 == 4 for _, o in shards[:3])
    feats = np.concatenate([f for f, _ in shards])
    counts = np.concatenate([np.diff(o) for _, o in shards])
    assert np.array_equal(counts, np.diff(ref_o))
    assert np.allclose(feats, ref_f, atol=1e-5)


def test_projections():
    p = random_projection(64, 8, seed=0)
    assert p.shape == (64, 8) and np.array_equal(p, random_projection(64, 8, seed=0))
    x = np.random.default_rng(0).standard_normal((500, 16)) * 2.0 ** -np.arange(16)
    q = pca_projection(x, 4)
    assert np.allclose(q.T @ q, np.eye(4), atol=1e-5)
    assert abs(q[0, 0]) > 0.99  # the highest-energy direction first
    f = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert np.allclose(mean_pool(f, np.array([0, 2, 2, 6])), [[1, 2], [0, 0], [7, 8]])


def _examples_artifact(root: str, pairs) -> str:
    n = len(pairs)
    table = pa.table({"id": [f"ex{i}" for i in range(n)], "prompt": [p for p, _ in pairs],
                      "response": [r for _, r in pairs], "source": ["t"] * n, "group": ["t"] * n,
                      "turns": [""] * n, "origin": ["t"] * n, "format": ["prompt_response"] * n, "raw": ["{}"] * n,
                      "prompt_tokens": [1] * n, "response_tokens": [1] * n,
                      "split": ["heldout" if i == 2 else "train" for i in range(n)]})
    w = ArtifactStore(root).begin("examples", "test")
    w.write_table("examples.parquet", table, EXAMPLES)
    n_train = table.column("split").to_pylist().count("train")  # as tasks.ingest records it
    w.meta.update(examples_meta(n_train=n_train, n_examples=n, records=n, n_heldout=n - n_train))
    return w.commit()


def test_shard_tasks_commit_and_load(tiny, tmp_path):
    root = str(tmp_path / "store")
    ex = _examples_artifact(root, EXAMPLES_QA)
    fp = model_fingerprint("tiny-gpt2")
    proj = fit_projection(ex, "tiny-gpt2", fp, 16, "random", 48, 512, "float32", root)
    shard_uris = [embed_shard(ex, k, 6, "tiny-gpt2", fp, 48, 512, "float32", proj, root) for k in range(3)]
    assert embed_shard(ex, 0, 6, "tiny-gpt2", fp, 48, 512, "float32", proj, root) == shard_uris[0]  # reused
    uri = commit_features(ex, shard_uris, root)
    from sftcurate.core.ingest import load_pool

    pool = load_pool(ex)
    inputs = SelectorInputs(pool=pool, token_counts=np.ones(pool.num_rows, dtype=np.int64))
    load_into(uri, inputs)
    feats, offsets = inputs.token_features
    train_pairs = [p for i, p in enumerate(EXAMPLES_QA) if i != 2]
    ref_f, ref_o = embed_one_by_one(tiny.model, tiny.tokenizer, train_pairs, 48)
    assert feats.shape == (ref_f.shape[0], 16) and np.array_equal(offsets, ref_o)
    assert np.allclose(feats, ref_f @ random_projection(64, 16), atol=1e-4)
    load_sentence_embeddings_into(uri, inputs)
    assert inputs.sentence_embeddings.shape == (pool.num_rows, 16)
    f2, o2 = load_features_file(uri)
    assert np.array_equal(f2, feats) and np.array_equal(o2, offsets)
    # a pool in another order is refused
    other = SelectorInputs(pool=pool.take(list(range(pool.num_rows))[::-1]), token_counts=inputs.token_counts)
    with pytest.raises(ContractError, match="different pool"):
        load_into(uri, other)


def test_final_artifact_references_memory_mapped_shards(tmp_path):
    """commit_features writes references, not bytes; the reader maps the shard files in place (no copy), follows
    the references in pool order, and names a wiped shard; a shard folder or file stands for its own rows."""
    import mmap
    import shutil

    from sftcurate.core.embedding import SHARD_KIND
    from sftcurate.core.feature_rows import ShardedRows
    from sftcurate.core.inputs import read_features_artifact
    from sftcurate.data_contracts import TOKEN_FEATURES, TOKEN_FEATURES_IDS
    from sftcurate.infra.store import read_manifest

    root = str(tmp_path / "store")
    ex = _examples_artifact(root, EXAMPLES_QA)  # 14 train examples
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5, size=14)
    lengths[3] = 0  # a sentence without loss tokens
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    feats = rng.standard_normal((int(offsets[-1]), 3)).astype(np.float32)
    shard_uris = []
    for k, (lo, hi) in enumerate([(0, 5), (5, 6), (6, 14)]):
        w = ArtifactStore(root).begin(SHARD_KIND, f"s{k}")
        o = offsets[lo:hi + 1] - offsets[lo]
        w.write_tensors("features.safetensors", {"features": feats[offsets[lo]:offsets[hi]], "offsets": o},
                        TOKEN_FEATURES)
        w.write_table("ids.parquet", pa.table({"id": [f"ex{i + (i >= 2)}" for i in range(lo, hi)],
                                               "pool_index": np.arange(lo, hi), "n_tokens": np.diff(o)}),
                      TOKEN_FEATURES_IDS)
        w.meta.update({"rows": hi - lo, "tokens": int(o[-1]), "d": 3, "model": "m", "projection_uri": None,
                       "shard_index": k, "shard_size": 8})
        shard_uris.append(w.commit())
    uri = commit_features(ex, shard_uris, root)
    assert sorted(read_manifest(uri)["files"]) == ["shards.json"]  # no feature bytes copied
    x, o, ids = read_features_artifact(uri)
    assert isinstance(x, ShardedRows) and len(x.blocks) == 3 and np.array_equal(o, offsets)
    assert ids == [f"ex{i + (i >= 2)}" for i in range(14)]
    for block in x.blocks:  # every block is a read-only view of a mapped file, not a copy
        base = block
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
        assert isinstance(base, mmap.mmap) and not block.flags.writeable
    assert np.array_equal(x.take(np.arange(len(feats))), feats) and np.array_equal(np.asarray(x), feats)
    assert np.allclose(mean_pool(x, o, chunk_rows=2), mean_pool(feats, offsets))
    f1, o1 = load_features_file(shard_uris[2])  # a shard artifact: its own rows
    assert np.array_equal(np.asarray(f1), feats[offsets[6]:]) and np.array_equal(o1, offsets[6:] - offsets[6])
    f2, _ = load_features_file(shard_uris[0] + "/features.safetensors")
    assert np.array_equal(f2, feats[:offsets[5]])
    shutil.rmtree(shard_uris[1])
    with pytest.raises(ContractError, match="shard 1 .* is missing from the store"):
        read_features_artifact(uri)


def test_s3_store_features_are_downloaded_once_and_mapped(tiny, s3_env, monkeypatch):
    from sftcurate.infra.settings import load_settings

    root = f"s3://{s3_env()}/sftcurate"
    ex = _examples_artifact(root, EXAMPLES_QA[:8])
    fp = model_fingerprint("tiny-gpt2")
    shards = [embed_shard(ex, k, 4, "tiny-gpt2", fp, 48, 512, "float32", None, root) for k in range(2)]
    uri = commit_features(ex, shards, root)
    feats, offsets = load_features_file(uri)
    ref_f, ref_o = embed_one_by_one(tiny.model, tiny.tokenizer, [p for i, p in enumerate(EXAMPLES_QA[:8]) if i != 2], 48)
    assert np.array_equal(offsets, ref_o) and np.allclose(np.asarray(feats), ref_f, atol=1e-4)
    cached = sorted((load_settings().home / "cache" / "tensors").glob("*.safetensors"))
    assert len(cached) >= 2  # named by sha256: a second read maps the same files
    load_features_file(uri)
    assert sorted((load_settings().home / "cache" / "tensors").glob("*.safetensors")) == cached


def _write(path, features, offsets):
    from safetensors.numpy import save_file  # written raw: the store's writer would refuse these

    save_file({"features": features, "offsets": offsets}, str(path))
    return str(path)


def test_bad_features_files_rejected(tmp_path):
    good_f = np.ones((5, 3), dtype=np.float32)
    good_o = np.array([0, 2, 5], dtype=np.int64)
    f, o = load_features_file(_write(tmp_path / "ok.safetensors", good_f, good_o))
    assert f.shape == (5, 3)
    cases = {
        "shape": (np.ones(5, dtype=np.float32), good_o, "expected 2 dimensions"),
        "monotone": (good_f, np.array([0, 4, 3, 5], dtype=np.int64), "not monotone at sentence 1"),
        "end": (good_f, np.array([0, 2, 4], dtype=np.int64), "'offsets' ends at 4"),
        "nan": (np.where(np.arange(15).reshape(5, 3) == 10, np.nan, 1.0).astype(np.float32), good_o,
                "row 3 \\(sentence 1\\) has NaN or inf"),
        "inf": (np.where(np.arange(15).reshape(5, 3) == 0, np.inf, 1.0).astype(np.float32), good_o, "NaN or inf"),
        "dtype": (good_f, good_o.astype(np.int32), "expected int64"),
    }
    for name, (feats, offs, msg) in cases.items():
        with pytest.raises(ContractError, match=msg):
            load_features_file(_write(tmp_path / f"{name}.safetensors", feats, offs))
    with pytest.raises(ContractError, match="expected d=4"):
        load_features_file(str(tmp_path / "ok.safetensors"), expected_d=4)
    with pytest.raises(ContractError, match="file not found"):
        load_features_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ContractError, match="not a .safetensors file"):
        load_features_file(str(tmp_path))


def test_shard_d_mismatch_rejected(tiny, tmp_path):
    root = str(tmp_path / "store")
    ex = _examples_artifact(root, EXAMPLES_QA[:6])
    fp = model_fingerprint("tiny-gpt2")
    full = embed_shard(ex, 0, 3, "tiny-gpt2", fp, 48, 512, "float32", None, root)
    proj = fit_projection(ex, "tiny-gpt2", fp, 8, "random", 48, 512, "float32", root)
    small = embed_shard(ex, 1, 3, "tiny-gpt2", fp, 48, 512, "float32", proj, root)
    with pytest.raises(ContractError, match="disagree on d"):
        commit_features(ex, [full, small], root)


def test_produce_through_prefect(prefect_harness, tmp_path, monkeypatch):
    from sftcurate.core.config import CurateConfig
    from sftcurate.tasks.curate import produce

    root = str(tmp_path / "store")
    monkeypatch.setenv("SFTCURATE_STORE", root)
    ex = _examples_artifact(root, EXAMPLES_QA)
    cfg = CurateConfig.model_validate({"models": {"target": "tiny-gpt2", "max_length": 48},
                                       "embedding": {"shard_size": 5, "batch_tokens": 512}})
    uri = produce("token_features", ex, cfg, None)
    # the final artifact references its shards (shards.json) and holds no copy of their features
    final = next((tmp_path / "store" / "token_features").glob("*"))
    assert uri.startswith(root) and (final / "shards.json").exists() and not list(final.glob("features*"))
    assert len(list((tmp_path / "store" / "token_features_shard").glob("*/features.safetensors"))) == 3
    feats, offsets = load_features_file(uri)
    assert len(offsets) - 1 == len(EXAMPLES_QA) - 1 and feats.shape[1] == 64
