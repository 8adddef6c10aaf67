"""DensitySampling and Ask-LLM selectors with tiny-gpt2: valid, seeded, budget-respecting selections."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sftcurate.infra.models import resolve_model
from sftcurate.core.embedding import embed_examples, mean_pool
from sftcurate.core.selectors import Budget, SelectorInputs, get_selector
from sftcurate.core.selectors.askllm import askllm_prompt, askllm_scores, answer_token_ids
from sftcurate.core.selectors.density import kernel_density

TEXTS = [("What is a list?", "A mutable sequence."), ("", "Dicts map keys to values."),
         ("Loop?", "for x in y: pass"), ("", "asdf qwer zxcv " * 4), ("Explain classes", "Classes bundle data.")] * 4




@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny-gpt2")


def _pool(n):
    return pa.table({"id": [f"e{i}" for i in range(n)], "prompt": [p for p, _ in TEXTS[:n]],
                     "response": [r for _, r in TEXTS[:n]]})


def test_density_with_tiny_gpt2_embeddings(tiny):
    feats, offsets = next(embed_examples(tiny.model, tiny.tokenizer, TEXTS, 64, 512, "float32", "cpu"))
    emb = mean_pool(feats, offsets)
    counts = np.diff(offsets)
    inputs = SelectorInputs(pool=_pool(len(TEXTS)), token_counts=counts, sentence_embeddings=emb)
    sel = get_selector("density").select(inputs, Budget(examples=6), seed=1)
    assert len(sel.indices) == 6 and len(set(sel.indices)) == 6 and len(sel.scores) == 6
    assert sel.indices == get_selector("density").select(inputs, Budget(examples=6), seed=1).indices
    tok = get_selector("density").select(inputs, Budget(tokens=30), seed=2)
    assert counts[tok.indices].sum() <= 30


def test_density_prefers_sparse_regions():
    rng = np.random.default_rng(0)
    dense = rng.normal(0, 0.01, (200, 2)) + [1.0, 0.0]
    sparse = np.array([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.7, 0.7]])
    emb = np.concatenate([dense, sparse])
    density, h = kernel_density(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    assert density[200:].max() < density[:200].min() and h > 0
    inputs = SelectorInputs(pool=pa.table({"id": [str(i) for i in range(204)]}),
                            token_counts=np.ones(204, dtype=np.int64), sentence_embeddings=emb)
    hits = [len(set(get_selector("density").select(inputs, Budget(examples=10), s).indices) & set(range(200, 204)))
            for s in range(5)]
    assert np.mean(hits) >= 3.5  # uniform would take ~0.2 of the 4 sparse points
    approx, _ = kernel_density(emb, exact_max=50, sample=150, seed=0)
    exact, _ = kernel_density(emb, bandwidth=_, seed=0)
    assert np.corrcoef(approx, exact)[0, 1] > 0.95


def test_askllm_with_tiny_gpt2(tiny):
    yes, no = answer_token_ids(tiny.tokenizer)
    assert yes and no and not set(yes) & set(no)
    assert askllm_prompt("X").startswith("###\nX\n###\nDoes the previous paragraph")
    texts = [r for _, r in TEXTS[:5]]
    batched = askllm_scores(tiny.model, tiny.tokenizer, texts, batch_tokens=4096, max_length=512)
    single = np.array([askllm_scores(tiny.model, tiny.tokenizer, [t], 4096, 512)[0] for t in texts])
    assert np.allclose(batched, single, atol=1e-5) and ((batched > 0) & (batched < 1)).all()
    pool = _pool(8)
    counts = np.arange(1, 9, dtype=np.int64)
    inputs = SelectorInputs(pool=pool, token_counts=counts, model_spec="tiny-gpt2")
    sel = get_selector("askllm", dict(device="cpu")).select(inputs, Budget(examples=3), 0)
    assert len(sel.indices) == 3 and sel.scores == sorted(sel.scores, reverse=True)
    tok = get_selector("askllm", dict(device="cpu")).select(inputs, Budget(tokens=10), 0)
    assert counts[tok.indices].sum() <= 10
