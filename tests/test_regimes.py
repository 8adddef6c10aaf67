"""The evidence regimes' builders (benchmarks/regimes.py) keep the held-out split clean and are reproducible."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import regimes  # noqa: E402


def corpus(n_groups: int = 5, sizes=(400, 300, 40, 30, 20)) -> list[dict]:
    return [regimes.record(f"question {g}-{i}?", f"the answer to {g}-{i} is {i * 7 % 13}", f"g{g}")
            for g in range(n_groups) for i in range(sizes[g])]


def texts(records, split):
    return {(r["instruction"], r["output"]) for r in records if r["split"] == split}


def test_skewed_pool_keeps_the_corpus_mix_and_a_balanced_clean_heldout():
    recs = corpus()
    pool = regimes.skewed(recs, pool_size=500, heldout_per_group=8, seed=1)
    held = [r for r in pool if r["split"] == "heldout"]
    train = [r for r in pool if r["split"] == "train"]
    assert Counter(r["group"] for r in held) == {f"g{g}": 8 for g in range(5)}
    assert len(train) == 500 and not texts(pool, "heldout") & texts(pool, "train")
    shares = Counter(r["group"] for r in train)
    assert (shares["g0"] + shares["g1"]) / len(train) > 0.8          # two groups >= 80% of the pool
    assert pool == regimes.skewed(recs, pool_size=500, heldout_per_group=8, seed=1)


def test_noisy_pool_damages_thirty_percent_of_training_records_and_never_the_heldout():
    recs = corpus()
    pool = regimes.noisy(recs, share=0.3, seed=2)
    train = [r for r in pool if r["split"] == "train"]
    held = [r for r in pool if r["split"] == "heldout"]
    kinds = Counter(r["damage"] for r in train)
    assert sum(kinds[k] for k in regimes.DAMAGES) == pytest.approx(0.3 * len(train), abs=1)
    assert max(kinds[k] for k in regimes.DAMAGES) - min(kinds[k] for k in regimes.DAMAGES) <= 1
    assert all(r["damage"] == "clean" for r in held) and held
    originals = {(r["instruction"], r["output"]) for r in recs}
    assert texts(pool, "heldout") <= originals                        # held-out records are clean originals
    held_prompts = {r["instruction"] for r in held}
    assert not held_prompts & {r["instruction"] for r in train}       # no damaged form of a held-out record
    # every damaged record keeps its prompt and lost its own answer (the corpus's answers are all distinct)
    assert all(r["instruction"] == o["instruction"] and (r["output"] != o["output"]) == (r["damage"] != "clean")
               for r, o in zip(pool, recs))
    assert all(o["output"].startswith(r["output"]) for r, o in zip(pool, recs) if r["damage"] == "cut")
    assert pool == regimes.noisy(recs, share=0.3, seed=2)


def test_targeted_pool_heldout_is_the_target_groups_and_the_target_is_in_neither():
    recs = corpus()
    pool, target = regimes.targeted(recs, ["g2", "g3"], n_target=10, heldout_per_group=6, seed=3)
    held = [r for r in pool if r["split"] == "heldout"]
    assert Counter(r["group"] for r in held) == {"g2": 6, "g3": 6}
    assert Counter(r["group"] for r in target) == {"g2": 5, "g3": 5}
    target_texts = {(r["instruction"], r["output"]) for r in target}
    assert not target_texts & {(r["instruction"], r["output"]) for r in pool}
    assert not texts(pool, "heldout") & texts(pool, "train")
    assert len(pool) + len(target) == len(recs)
    with pytest.raises(ValueError, match="not in the corpus"):
        regimes.targeted(recs, ["nope"], 4, 2)
