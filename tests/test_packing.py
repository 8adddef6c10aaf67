"""Packed passes (core.packing) compute what the padded ones do: token features, per-example losses and the
training loss with its gradients, checked on a CPU in float32 through the block-diagonal reference attention
(on a GPU the same rows go through the flash variable-length kernel; benchmarks/bench_gpu.py compares them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftcurate.core import head_loss
from sftcurate.core.embedding import embed_encoded, embed_packed
from sftcurate.core.packing import pack, packed_batches, packs
from sftcurate.core.tokenize import Encoded
from sftcurate.core.training import Recipe, batch_loss
from sftcurate.core.trajectories import example_losses, packed_example_losses
from sftcurate.infra.models import resolve_model


def tiny_llama():
    torch.manual_seed(0)  # grouped-query attention (2 kv heads for 4 query heads) and rotary positions
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    return tiny_llama() if request.param == "llama" else resolve_model("tiny-gpt2").model.eval()


def examples(seed: int = 0, n: int = 23):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, 30))
        prompt = int(rng.integers(1, length))     # the first token is a prompt token, as tokenize makes it
        out.append(Encoded(rng.integers(1, 100, length).tolist(), [0] * prompt + [1] * (length - prompt)))
    return out


def test_packed_features_equal_padded(model):
    enc = examples()
    proj = np.random.default_rng(1).standard_normal((model.config.hidden_size, 8)).astype(np.float32)
    for projection in (None, proj):
        ref, ref_off = embed_encoded(model, enc, 64, torch.device("cpu"), projection)
        got, off = embed_packed(model, enc, 64, torch.device("cpu"), projection)
        assert np.array_equal(off, ref_off)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_packed_example_losses_equal_padded(model):
    enc = examples(2)
    np.testing.assert_allclose(packed_example_losses(model, enc, 50), example_losses(model, enc, 50),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_packed_training_loss_and_gradients_equal_padded(model, head, monkeypatch):
    """A trained head takes autograd; a frozen one (LoRA's case) the fused chunked loss (`head_loss`), on both
    the padded and the packed batch."""
    model.get_output_embeddings().weight.requires_grad_(head == "trained")
    fused = []
    apply = head_loss._FrozenHeadCrossEntropy.apply
    monkeypatch.setattr(head_loss._FrozenHeadCrossEntropy, "apply", lambda *a: fused.append(1) or apply(*a))
    enc = examples(3, n=6)
    recipe = Recipe(steps=1, learning_rate=1e-3, batch_size=6)
    results = []
    for packed in (False, True):
        model.zero_grad()
        loss, n_tok, real, padded = batch_loss(model, enc, 0, recipe, torch.device("cpu"), packed)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((float(loss), n_tok, real, padded, grads))
    (l0, n0, r0, p0, g0), (l1, n1, r1, p1, g1) = results
    assert n1 == n0 and r1 == r0 == sum(len(e.input_ids) for e in enc) and p1 == r1 <= p0
    assert len(fused) == (2 if head == "frozen" else 0)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_packed_batches_cover_every_example_once_within_the_token_budget():
    lengths = np.random.default_rng(4).integers(1, 200, 300)
    batches = packed_batches(lengths, 1000)
    assert sorted(np.concatenate(batches).tolist()) == list(range(300))
    for b in batches:
        assert lengths[b].sum() <= 1000 or len(b) == 1
    assert packed_batches(np.array([5000, 3]), 1000)[0].tolist() == [0]   # longer than a batch: alone


def test_pack_positions_restart_and_loss_rows_predict_loss_tokens():
    enc = [Encoded([5, 6, 7], [0, 1, 1]), Encoded([8, 9], [1, 1])]
    pb = pack(enc, "cpu")
    assert pb.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert pb.cu_seqlens.tolist() == [0, 3, 5]
    # a sequence's first token is never predicted; row t-1 predicts token t
    assert pb.loss_rows.tolist() == [0, 1, 3] and pb.loss_targets.tolist() == [6, 7, 9]
    assert pb.loss_example.tolist() == [0, 0, 1]


def test_cpu_keeps_the_padded_path():
    assert not packs(tiny_llama())
