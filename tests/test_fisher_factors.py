"""`embedding.sentence_rank`: the token-features artifact stores each sentence's rank-r factor, and FisherSFT on
it picks what it picks on the tokens when every sentence's rank fits (issue 25, item 2)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sftcurate.core.config import CurateConfig
from sftcurate.core.embedding import commit_features, embed_shard, fit_projection
from sftcurate.core.fisher import LogDetObjective
from sftcurate.core.fisher_device import DeviceLogDet, device_lazy_greedy
from sftcurate.core.fisher_features import sentence_factors, stored_factors
from sftcurate.core.fisher_greedy import lazy_greedy, naive_greedy, stochastic_greedy
from sftcurate.core.ingest import load_pool
from sftcurate.core.inputs import load_sentence_embeddings_into, read_features_file, read_stored_features
from sftcurate.core.requirements import requirement
from sftcurate.core.selectors import Budget, SelectorInputs, get_selector
from sftcurate.data_contracts import EXAMPLES, ContractError
from sftcurate.infra.models import model_fingerprint
from sftcurate.infra.store import ArtifactStore, read_manifest

WORDS = "the list holds items while a dict maps keys to values and loops iterate over both of them".split()


def pairs(n: int = 14) -> list[tuple[str, str]]:
    """Responses of 1 to ~40 loss tokens, so that at d_proj 6 most sentences are longer than d."""
    rng = np.random.default_rng(0)
    return [(f"Question {i}?", " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))) for i in range(n)]


def examples_artifact(root: str, rows) -> str:
    n = len(rows)
    table = pa.table({"id": [f"ex{i}" for i in range(n)], "prompt": [p for p, _ in rows],
                      "response": [r for _, r in rows], "source": ["t"] * n, "group": ["t"] * n,
                      "turns": [""] * n, "origin": ["t"] * n, "format": ["prompt_response"] * n, "raw": ["{}"] * n,
                      "prompt_tokens": [1] * n, "response_tokens": [1] * n, "split": ["train"] * n})
    w = ArtifactStore(root).begin("examples", "test")
    w.write_table("examples.parquet", table, EXAMPLES)
    w.meta["fingerprint"] = "fp-test"
    w.meta["n_train"] = n
    return w.commit()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One pool embedded by tiny-gpt2, projected to d=6, as tokens and at sentence ranks 6 (>= every sentence's
    rank: d) and 2 (below most), in two shards each."""
    root = str(tmp_path_factory.mktemp("factors") / "store")
    ex = examples_artifact(root, pairs())
    fp = model_fingerprint("tiny-gpt2")
    proj = fit_projection(ex, "tiny-gpt2", fp, 6, "random", 48, 512, "float32", root)
    uris = {rank: commit_features(ex, [embed_shard(ex, k, 8, "tiny-gpt2", fp, 48, 512, "float32", proj, root,
                                                   sentence_rank=rank) for k in range(2)], root)
            for rank in (None, 6, 2)}
    return ex, proj, uris, root


def selection(uri: str, budget: Budget, pool, algorithm: str = "lazy"):
    stored = read_stored_features(uri)
    inputs = SelectorInputs(pool=pool, token_counts=stored.tokens, token_features=(stored.rows, stored.offsets))
    return get_selector("fishersft", {"algorithm": algorithm}).select(inputs, budget, 0)


def test_factors_stored_with_real_token_counts_and_kept_energy(store):
    ex, _, uris, _ = store
    tokens, exact, low = (read_stored_features(uris[r]) for r in (None, 6, 2))
    lengths = np.diff(tokens.offsets)
    assert tokens.rank is None and exact.rank == 6 and low.rank == 2
    assert (lengths > 6).sum() >= 4                              # factors that are not the tokens themselves
    for stored, r in ((exact, 6), (low, 2)):                     # token budgets count the real loss tokens
        assert np.array_equal(stored.tokens, lengths) and np.array_equal(np.diff(stored.offsets),
                                                                         np.minimum(lengths, r))
    _, _, kept = sentence_factors(tokens.rows, tokens.offsets, 2)
    meta = read_manifest(uris[2])["meta"]
    assert meta["sentence_rank"] == 2 and meta["feature_rows"] == int(np.minimum(lengths, 2).sum())
    assert meta["kept_energy_min"] == pytest.approx(kept.min(), rel=1e-5)
    assert meta["kept_energy_mean"] == pytest.approx(kept.mean(), rel=1e-5)
    assert read_manifest(uris[6])["meta"]["kept_energy_min"] == pytest.approx(1.0, abs=1e-5)
    assert "sentence_rank" not in read_manifest(uris[None])["meta"] or \
        read_manifest(uris[None])["meta"]["sentence_rank"] is None
    # read as a file (`sftcurate select --features`): the same rows and the real token counts
    as_file = read_features_file(uris[2])
    assert as_file.rank == 2 and np.array_equal(as_file.tokens, lengths)


def test_select_on_stored_factors_equals_select_on_tokens_when_rank_fits(store):
    ex, _, uris, _ = store
    pool = load_pool(ex)
    for budget in (Budget(examples=5), Budget(tokens=120)):
        for algorithm in ("lazy", "naive"):
            on_tokens = selection(uris[None], budget, pool, algorithm)
            on_factors = selection(uris[6], budget, pool, algorithm)
            assert on_factors.indices == on_tokens.indices
            assert on_factors.objective == pytest.approx(on_tokens.objective, rel=1e-6)
            assert on_factors.info["tokens"] == on_tokens.info["tokens"]   # the budget counts tokens, not rows
    spent = selection(uris[2], Budget(tokens=120), pool)
    lengths = read_stored_features(uris[None]).tokens
    assert spent.info["tokens"] == int(lengths[spent.indices].sum()) <= 120


def test_factor_rows_below_the_rank_lose_at_most_the_dropped_energy(store):
    _, _, uris, _ = store
    tokens, low = read_stored_features(uris[None]), read_stored_features(uris[2])
    x = np.asarray(tokens.rows.take(np.arange(int(tokens.offsets[-1]))))
    tensors, _ = stored_factors(x, tokens.offsets, 2)
    energy = np.add.reduceat((x.astype(np.float64) ** 2).sum(1), tokens.offsets[:-1])
    lam = 0.5
    exact = LogDetObjective(x, tokens.offsets, lam).gains(np.arange(len(energy)))
    factored = LogDetObjective(low.rows, low.offsets, lam).gains(np.arange(len(energy)))
    lost = exact - factored
    assert (lost >= -1e-6).all() and (lost <= (1 - tensors["kept_energy"]) * energy / lam + 1e-5).all()
    assert (lost > 1e-6).any()                                  # rank 2 does drop something here


def test_every_greedy_uses_factor_rows_like_token_rows():
    """Sentences of rank <= 3 in d=8, longer than 3: factors at rank 3 give every greedy the tokens' picks."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 12, 50)
    x = np.concatenate([rng.standard_normal((int(L), 3)) @ rng.standard_normal((3, 8)) for L in lengths])
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = x.astype(np.float32)
    fx, foff, kept = sentence_factors(x, off, 3)
    assert np.allclose(kept, 1.0, atol=1e-6) and len(fx) == 3 * len(lengths)
    for run in (lambda f, o: naive_greedy(LogDetObjective(f, o, 1.0), token_budget=60, rule="gain", costs=lengths),
                lambda f, o: lazy_greedy(LogDetObjective(f, o, 1.0), token_budget=60, costs=lengths),
                lambda f, o: stochastic_greedy(LogDetObjective(f, o, 1.0), k=6, epsilon=0.3, seed=2,
                                                   costs=lengths),
                lambda f, o: device_lazy_greedy(DeviceLogDet(f, o, 1.0, device="cpu"), token_budget=60,
                                                costs=lengths)):
        on_tokens, on_factors = run(x, off), run(fx, foff)
        assert on_factors.picks == on_tokens.picks
        assert np.allclose(on_factors.gains, on_tokens.gains, rtol=1e-4, atol=1e-6)
        assert on_factors.info.get("tokens") == on_tokens.info.get("tokens")


def test_sentence_embeddings_are_never_read_from_factors(store, monkeypatch):
    ex, proj, uris, root = store
    pool = load_pool(ex)
    with pytest.raises(ContractError, match="sentence factors"):
        load_sentence_embeddings_into(uris[2], SelectorInputs(pool=pool, token_counts=np.ones(pool.num_rows)))
    with pytest.raises(ContractError, match="sentence factors"):
        requirement("sentence_embeddings").from_file.read(uris[2], SelectorInputs(
            pool=pool, token_counts=np.ones(pool.num_rows)))
    # the curate flow: FisherSFT's production applies the rank, the sentence embeddings' embeds tokens
    monkeypatch.setenv("SFTCURATE_STORE", root)
    cfg = CurateConfig.model_validate({"models": {"target": "tiny-gpt2", "max_length": 48},
                                       "embedding": {"shard_size": 8, "batch_tokens": 512, "d_proj": 6,
                                                     "sentence_rank": 2}})
    factors = requirement("token_features").produce.shard.run(ex, cfg, proj, 0)
    tokens = requirement("sentence_embeddings").produce.shard.run(ex, cfg, proj, 0)
    assert read_manifest(factors)["meta"]["sentence_rank"] == 2
    assert read_manifest(tokens)["meta"].get("sentence_rank") is None


def test_targeted_selection_on_factors_spends_loss_tokens(store):
    """The targeted greedy (fishersft_target) on exact factors picks what it picks on the tokens under a token
    budget: a sentence costs its loss tokens, not its factor rows (which would let more sentences fit)."""
    from sftcurate.core.target import TARGET_FEATURES

    ex, _, uris, _ = store
    pool = load_pool(ex)
    tokens = read_stored_features(uris[None])
    target = (np.asarray(tokens.rows.take(np.arange(int(tokens.offsets[3])))), tokens.offsets[:4])
    runs = []
    for rank in (None, 6):
        stored = read_stored_features(uris[rank])
        inputs = SelectorInputs(pool=pool, token_counts=stored.tokens, token_features=(stored.rows, stored.offsets))
        inputs.extra[TARGET_FEATURES] = target
        res = get_selector("fishersft_target", {}).select(inputs, Budget(tokens=80), 0)
        runs.append((res.indices, int(stored.tokens[res.indices].sum())))
    assert runs[0] == runs[1] and runs[0][1] <= 80
