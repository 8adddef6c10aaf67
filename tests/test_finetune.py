"""Target fine-tuning: fair across methods, actually learns, resumes after a crash, works on S3."""
from __future__ import annotations

import numpy as np
import pytest

from sftcurate.infra import tracking
from sftcurate.infra.store import ArtifactStore, read_bytes, read_manifest
from sftcurate.core.config import SourceConfig
from sftcurate.core.evaluate import evaluate_heldout, read_eval
from sftcurate.core.finetune import (
    Checkpoints, FinetuneConfig, default_target_modules, finetune, finetune_key, load_finetuned,
)
from sftcurate.core.ingest import ingest, source_fingerprint
from sftcurate.core.selection import run_selection
from sftcurate.core.selectors.base import Budget
from sftcurate.core.training import batch_schedule
from tests.helpers import progress_steps, qa_records, write_jsonl


class SimulatedCrash(RuntimeError):
    pass

TINY = "tiny-gpt2"
FP = "tiny-fp"


def make_examples(tmp_path, n: int = 60) -> str:
    src = SourceConfig(uri=str(write_jsonl(tmp_path / "qa.jsonl", qa_records(n))), heldout_fraction=0.2)
    return ingest(src, source_fingerprint(src), TINY, 96)


def select(examples_uri: str, budget: int, seed: int = 0) -> str:
    return run_selection(examples_uri, "uniform", Budget(budget), seed, {}, {})


def test_schedule_is_deterministic_and_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(5, 200, size=400)
    a = batch_schedule(lengths, 8, 60, seed=3)
    assert all((x == y).all() for x, y in zip(a, batch_schedule(lengths, 8, 60, seed=3)))
    assert len(a) == 60 and all(len(b) == 8 for b in a)

    def padded(schedule, to_max=False):
        return sum(len(b) * (200 if to_max else lengths[b].max()) for b in schedule)

    real = sum(lengths[b].sum() for b in a)
    rand = batch_schedule(lengths, 8, 60, seed=3, batching="random")
    assert real / padded(a) > 0.9 > real / padded(rand)
    # every example is seen once per epoch (50 batches of 8 = one epoch of 400)
    assert sorted(np.concatenate(a[:50]).tolist()) == list(range(400))


def test_widths_rounded_to_a_multiple_train_the_same_weights():
    """GPU batches are padded to a multiple of 64 (few shapes); right padding is masked, so the arithmetic is the
    same (dropout, which draws masks of the padded shape, is what differs)."""
    from dataclasses import replace

    import torch

    from sftcurate.core.tokenize import encode_pairs
    from sftcurate.core.training import Recipe, batch_width, padded_width, train
    from sftcurate.infra.models import build_tiny_gpt2

    loaded = build_tiny_gpt2()
    pairs = [(f"Question {i}?", " ".join(["Python lists keep order"] * (1 + i % 7))) for i in range(24)]
    enc = encode_pairs(loaded.tokenizer, pairs, 160)
    longest = max(len(e.input_ids) for e in enc[:3])
    assert longest % 64 and padded_width(enc[:3], 64, 160) == min(160, -(-longest // 64) * 64)
    assert padded_width(enc[:3], 1, 160) == longest and padded_width(enc[:3], 64, longest) == longest
    recipe = Recipe(steps=4, learning_rate=1e-2, batch_size=4, seed=0, max_length=160)
    assert batch_width(enc[:3], recipe, on_gpu=True) == padded_width(enc[:3], 64, 160)   # the GPU default
    assert batch_width(enc[:3], recipe, on_gpu=False) is None                            # exact on a CPU
    assert batch_width(enc[:3], replace(recipe, batching="pad_to_max"), on_gpu=True) == 160
    runs = {}
    for multiple in (1, 64):
        model = build_tiny_gpt2().model
        for module in model.modules():  # dropout draws masks of the padded shape: off, to compare the arithmetic
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        stats = train(model, 0, enc, replace(recipe, pad_multiple=multiple))
        runs[multiple] = (stats, torch.cat([p.detach().flatten() for p in model.parameters()]))
    exact, rounded = runs[1][0], runs[64][0]
    assert rounded.padded_tokens > exact.padded_tokens and rounded.real_tokens == exact.real_tokens
    assert np.allclose(rounded.losses, exact.losses, rtol=1e-4, atol=1e-5)
    assert (runs[1][1] - runs[64][1]).abs().max() < 1e-4  # float noise through 4 AdamW steps at lr 1e-2


def test_lora_targets_per_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from sftcurate.infra.models import build_tiny_gpt2

    assert default_target_modules(build_tiny_gpt2().model) == ["c_attn"]
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    assert default_target_modules(llama) == ["q_proj", "v_proj"]
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                   vocab_size=64, word_embed_proj_dim=32))
    assert default_target_modules(opt) == "all-linear"


def test_fair_across_methods_recorded_in_mlflow(tmp_path, store_root):
    ex = make_examples(tmp_path)
    cfg = FinetuneConfig(steps=6, batch_size=4, max_length=96, learning_rate=1e-3)
    params, metrics = [], []
    for seed in (0, 1):  # two different selections of the same budget
        sel = select(ex, 12, seed)
        with tracking.start_run(f"cell-{seed}") as run_id:
            uri = finetune(ex, sel, TINY, FP, cfg, run_id)
        assert read_manifest(uri)["meta"]["steps_done"] == cfg.steps
        run = tracking.client().get_run(run_id)
        params.append({k: v for k, v in run.data.params.items() if k.startswith("finetune.")})
        metrics.append(run.data.metrics)
        history = tracking.client().get_metric_history(run_id, "finetune/loss")
        assert history and max(m.step for m in history) == cfg.steps  # the training curve is there
        seen = sorted((m.step, m.value) for m in tracking.client().get_metric_history(run_id, "finetune/tokens_seen"))
        assert seen[0][0] > 0 and [v for _, v in seen] == sorted(v for _, v in seen)  # no total at step 0: no dip
    assert params[0] == params[1] and params[0]["finetune.steps"] == "6" and params[0]["finetune.batch_size"] == "4"
    assert metrics[0]["finetune/steps_done"] == metrics[1]["finetune/steps_done"] == 6


@pytest.mark.parametrize("full", [False, True])
def test_finetuned_heldout_loss_beats_base(tmp_path, store_root, full):
    ex = make_examples(tmp_path)
    sel = select(ex, 32)
    cfg = FinetuneConfig(steps=30, batch_size=8, max_length=96, full=full, learning_rate=1e-2 if not full else 2e-3)
    uri = finetune(ex, sel, TINY, FP, cfg)
    base = read_eval(evaluate_heldout(ex, None, TINY, FP, 96))
    tuned = read_eval(evaluate_heldout(ex, uri, TINY, FP, 96))
    assert tuned["tokens"] == base["tokens"] > 0
    assert tuned["loss"] < base["loss"] - (1.0 if full else 0.05), (base, tuned)
    assert read_manifest(uri)["meta"]["mode"] == ("full" if full else "lora")
    model, tok = load_finetuned(uri)
    assert not model.training and tok.eos_token_id is not None


def test_diverging_loss_is_a_user_error_and_commits_nothing(tmp_path, store_root):
    from sftcurate.data_contracts import UserError
    from sftcurate.infra.store import ArtifactStore

    ex = make_examples(tmp_path)
    sel = select(ex, 16)
    cfg = FinetuneConfig(steps=6, batch_size=8, max_length=96, full=True, learning_rate=1e12, checkpoint_every=2)
    with pytest.raises(UserError, match=r"^finetune: the training loss became (nan|inf) at step \d+; lower "
                                        r"finetune.learning_rate$"):
        finetune(ex, sel, TINY, FP, cfg)
    assert ArtifactStore().committed("finetuned", finetune_key(ex, sel, FP, cfg)) is None


def _weights(uri: str) -> dict:
    from safetensors.numpy import load

    return load(read_bytes(f"{uri}/adapter_model.safetensors"))


def test_resume_after_crash_matches_uninterrupted_run_on_s3(tmp_path, s3_store):
    ex = make_examples(tmp_path)
    sel = select(ex, 16)
    cfg = FinetuneConfig(steps=10, batch_size=4, max_length=96, checkpoint_every=4, lora_dropout=0.1,
                         learning_rate=5e-3)
    key = finetune_key(ex, sel, FP, cfg)
    with pytest.raises(SimulatedCrash), progress_steps([], raise_at=6, error=SimulatedCrash):
        finetune(ex, sel, TINY, FP, cfg)
    ckpts = Checkpoints(ArtifactStore(), key)
    assert ckpts.latest_step() == 4  # committed at step 4; step 6 crashed before the step-8 checkpoint
    uri = finetune(ex, sel, TINY, FP, cfg)
    assert uri.startswith("s3://")
    meta = read_manifest(uri)["meta"]
    assert meta["resumed_from"] == 4 and meta["steps_done"] == 10
    assert ckpts.latest_step() is None  # checkpoints are cleared once the final model is committed
    # the same recipe without a crash, in another store, gives the same weights (schedule + RNG restored)
    reference = finetune(ex, sel, TINY, FP, cfg, store_root=str(tmp_path / "ref"))
    a, b = _weights(uri), _weights(reference)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    model, _ = load_finetuned(uri)  # loads from S3
    assert model is not None


def test_generation_protocol_plain_text_prompts_and_left_padded_batches(tmp_path, store_root):
    from sftcurate.infra.models import build_tiny_gpt2
    from sftcurate.core.evaluate import GenerationConfig, generate, generate_texts, generation_prompts, load_generations

    passages = [{"text": " ".join(f"word{i}_{j}" for j in range(30))} for i in range(40)]
    src = SourceConfig(uri=str(write_jsonl(tmp_path / "text.jsonl", passages)), heldout_fraction=0.3)
    ex = ingest(src, source_fingerprint(src), TINY, 96)
    cfg = GenerationConfig(max_prompts=5, max_new_tokens=5, prompt_words=12, batch_size=3)
    prompts = generation_prompts(ex, cfg)
    assert len(prompts) == 5 and prompts == generation_prompts(ex, cfg)  # seeded, identical for every model
    for p in prompts:  # the paper's protocol: the first 12 words of a held-out passage, the rest is the reference
        assert len(p["prompt"].split()) == 12 and (p["prompt"] + p["reference"]).split() == \
            [f"{p['prompt'].split('_')[0]}_{j}" for j in range(30)]
    tiny = build_tiny_gpt2()
    texts = ["short", "a much longer prompt with many more words in it than the first", "mid length one"]
    batched = generate_texts(tiny.model, tiny.tokenizer, texts, GenerationConfig(max_new_tokens=6, batch_size=3))
    single = [generate_texts(tiny.model, tiny.tokenizer, [t], GenerationConfig(max_new_tokens=6))[0] for t in texts]
    assert batched == single  # left padding does not change greedy outputs
    table = load_generations(generate(ex, None, TINY, FP, cfg))
    assert table.column_names == ["prompt_id", "prompt", "reference", "text"] and table.num_rows == 5


