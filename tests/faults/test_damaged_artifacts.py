"""Issue 28, verified reads: a committed artifact whose files no longer match its manifest (altered in place,
truncated, deleted) is never used: a stage rebuilds it and says so in one line, a reader outside a stage stops
with one line, and `sftcurate verify` finds it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sftcurate.infra import progress, store
from sftcurate.infra.store import DamagedArtifact, artifact_damage, verify_store
from sftcurate.core.config import CurateConfig
from tests.helpers import invoke, qa_records, write_jsonl
from tests.test_cache import curate_once, manifests, picks

pytestmark = [pytest.mark.faults]


class Rebuilt:
    """The `damaged` and `built` progress events while the block runs."""

    def __enter__(self):
        self.damaged, self.built = [], []

        def listen(name: str, event: str, detail: dict) -> None:
            if event == "damaged":
                self.damaged.append((name, detail["reason"]))
            elif event == "built":
                self.built.append(name)

        self._unsubscribe = progress.subscribe(listen)
        return self

    def __exit__(self, *exc):
        self._unsubscribe()


def small_config(method: str, root: str) -> CurateConfig:
    """60 short records in 3 feature shards of 20, tiny models."""
    pool = Path(root).parent / "pool.jsonl"
    if not pool.exists():
        write_jsonl(pool, qa_records(60))
    return CurateConfig.model_validate({
        "name": f"damaged-{method}", "source": {"uri": str(pool)},
        "selection": {"method": method, "budget": 8, "seed": 1},
        "models": {"target": "tiny-gpt2", "max_length": 128},
        "embedding": {"shard_size": 20, "batch_tokens": 2048}})


def artifact_of(root: str, kind: str) -> Path:
    return Path(root + next(k for k in sorted(manifests(root)) if k.startswith(f"/{kind}/")))


def test_a_feature_shard_altered_in_place_is_detected_and_rebuilt_and_the_selection_is_unchanged(store_root):
    from sftcurate.core.inputs import read_features_artifact

    cfg = small_config("fishersft", store_root)
    first, _ = curate_once(cfg)
    chosen = picks(first)
    shard = artifact_of(store_root, "token_features_shard") / "features.safetensors"
    size = shard.stat().st_size
    tensors = load_file(str(shard))
    tensors["features"] = tensors["features"] * 5  # same shape, same size: only the sha256 can tell
    save_file(tensors, str(shard), metadata=json.loads(shard.read_bytes()[8:8 + int.from_bytes(
        shard.read_bytes()[:8], "little")]).get("__metadata__"))
    assert shard.stat().st_size == size
    with pytest.raises(DamagedArtifact, match="features.safetensors does not match the sha256"):
        read_features_artifact(str(artifact_of(store_root, "token_features")))  # a reader outside a stage
    shutil.rmtree(artifact_of(store_root, "selection"))  # so the selector reads the features again
    with Rebuilt() as events:
        again, _ = curate_once(cfg)
    assert events.damaged == [("token_features_shard", "features.safetensors does not match the sha256 its "
                                                       "manifest records")]
    assert sorted(events.built) == ["selection", "token_features_shard"]
    assert again == first and picks(again) == chosen
    assert verify_store(store_root)["damaged"] == {}


@pytest.mark.parametrize("damage,reason", [
    (lambda f: f.unlink(), "examples.parquet is missing"),
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "examples.parquet has 100 bytes, its manifest records"),
])
def test_a_deleted_or_truncated_file_is_rebuilt_on_the_next_run(store_root, damage, reason):
    cfg = small_config("uniform", store_root)
    first, _ = curate_once(cfg)
    damage(artifact_of(store_root, "examples") / "examples.parquet")
    with Rebuilt() as events:
        again, _ = curate_once(cfg)
    assert [kind for kind, _ in events.damaged] == ["examples"] and reason in events.damaged[0][1]
    assert events.built == ["examples"] and again == first


def test_hashes_are_checked_once_per_file_identity_and_remembered_across_processes(store_root, monkeypatch):
    first, _ = curate_once(small_config("uniform", store_root))
    uri = str(artifact_of(store_root, "examples"))
    hashed = []
    real = store.file_digest
    monkeypatch.setattr(store, "file_digest", lambda u: hashed.append(u) or real(u))
    monkeypatch.setattr(store, "_verified_here", set())  # a new process; the files were committed by this one
    assert artifact_damage(uri) is None and hashed == []  # the commit remembered what it wrote
    shutil.rmtree(Path(os.environ["SFTCURATE_HOME"]) / "cache" / "verified")
    monkeypatch.setattr(store, "_verified_here", set())
    assert artifact_damage(uri) is None and len(hashed) == 1
    assert artifact_damage(uri) is None and len(hashed) == 1  # this process knows it now
    monkeypatch.setattr(store, "_verified_here", set())
    assert artifact_damage(uri) is None and len(hashed) == 1  # and so does the next one
    parquet = Path(uri) / "examples.parquet"
    data = bytearray(parquet.read_bytes())
    data[-20] ^= 0xFF  # one byte, same size: a new mtime makes it a new identity, hashed again
    parquet.write_bytes(bytes(data))
    assert "does not match the sha256" in artifact_damage(uri) and len(hashed) == 2


def test_sftcurate_verify_reports_damaged_artifacts_and_exits_1(store_root, tmp_path):
    curate_once(small_config("uniform", store_root))
    result = invoke("verify", store_root, "--json", tmp_path / "ok.json")
    assert result.exit_code == 0, result.output
    clean = json.loads((tmp_path / "ok.json").read_text())
    assert clean["checked"] == len(manifests(store_root)) >= 2 and clean["damaged"] == {}
    examples = artifact_of(store_root, "examples")
    (examples / "examples.parquet").write_bytes(b"x")
    result = invoke("verify", store_root)
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("damaged:")] == [
        f"damaged: {examples}: examples.parquet has 1 bytes, its manifest records "
        f"{json.loads((examples / '_MANIFEST.json').read_text())['files']['examples.parquet']['bytes']}"]
    assert invoke("verify", str(examples)).exit_code == 1
    nested = store.ArtifactWriter(uri=f"{store_root}/finetune_ckpt/k/step-0000001", kind="finetune_ckpt", key="k")
    nested.write_bytes("state.pt", b"0123456789")
    nested.commit()
    Path(nested.path("state.pt")).write_bytes(b"0123456780")  # a checkpoint nested in a stage's folder counts too
    damaged = verify_store(store_root)["damaged"]
    assert damaged[nested.uri] == "state.pt does not match the sha256 its manifest records" and len(damaged) == 2
    result = invoke("verify", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "no such store or artifact" in result.output


def test_a_run_says_in_one_line_what_it_rebuilds_and_a_damaged_selection_stops_export_in_one_line(
        prefect_harness, store_root, tmp_path, monkeypatch):
    pool = write_jsonl(tmp_path / "pool.jsonl", qa_records(30))
    config = tmp_path / "run.yaml"
    config.write_text(f"name: damaged\nsource: {{uri: {pool}}}\nselection: {{method: uniform, budget: 4}}\n"
                      "models: {target: tiny-gpt2, max_length: 128}\n")
    summary = tmp_path / "summary.json"
    assert invoke("run", config, "--json", summary).exit_code == 0
    selection = Path(json.loads(summary.read_text())["selection_uri"])
    examples = artifact_of(store_root, "examples")
    (examples / "examples.parquet").write_bytes(b"not the examples")
    result = invoke("run", config)
    assert result.exit_code == 0, result.output[-3000:]
    assert [line.strip() for line in result.output.splitlines() if "rebuilding" in line] == [
        f"rebuilding {examples}: damaged (examples.parquet has 16 bytes, its manifest records "
        f"{json.loads((examples / '_MANIFEST.json').read_text())['files']['examples.parquet']['bytes']})"]
    (selection / "selection.parquet").write_bytes(b"x" * 10)
    result = invoke("export", str(selection), "--out", tmp_path / "out.jsonl")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output
    assert f"{selection}: damaged artifact (selection.parquet has 10 bytes" in errors[0]
    assert "run the command that built it again" in errors[0] and not (tmp_path / "out.jsonl").exists()


def test_an_object_altered_on_s3_is_detected_by_its_etag_and_rebuilt(s3_store, tmp_path):
    from sftcurate.infra.store import filesystem_for, join, read_manifest

    pool = write_jsonl(tmp_path / "pool.jsonl", qa_records(30))
    cfg = CurateConfig.model_validate({"source": {"uri": str(pool)}, "selection": {"budget": 4},
                                       "models": {"target": "tiny-gpt2", "max_length": 128}})
    first, _ = curate_once(cfg)
    examples = read_manifest(first)["meta"]["examples_uri"]
    fs, path = filesystem_for(join(examples, "examples.parquet"))
    data = bytearray(fs.cat_file(path))
    data[-30] ^= 0xFF  # same size: only the hash can tell
    fs.pipe_file(path, bytes(data))
    assert "examples.parquet does not match the sha256" in artifact_damage(examples)
    with Rebuilt() as events:
        again, _ = curate_once(cfg)
    assert [kind for kind, _ in events.damaged] == ["examples"] and again == first
    result = verify_store(s3_store)
    assert result["damaged"] == {} and result["checked"] >= 2
