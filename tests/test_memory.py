"""Bounded memory (issue 28, item 7): a record longer than max_length is never tokenized whole (its first tokens are
those of the whole text), and per-example losses never hold a batch's logits over the whole vocabulary."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftcurate.core import head_loss, tokenize
from sftcurate.core.tokenize import encode_example, encode_pairs, head_ids, tail_ids, text_bound
from sftcurate.core.training import collate, row_loss_sums, token_loss_sum
from sftcurate.core.formats import normalize
from sftcurate.core.training_text import CHAT, PLAIN, ExampleText, fit_examples
from sftcurate.infra.models import build_tiny_gpt2, resolve_tokenizer
from tests.test_training_text import CHATML


def docs(chars: int) -> str:
    """Real text: Python's documentation topics, repeated up to `chars` characters."""
    from pydoc_data.topics import topics

    body = "\n\n".join(topics[k] for k in sorted(topics))
    return (body * (chars // len(body) + 1))[:chars]


class Recording:
    """A tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tok, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def tok():
    return resolve_tokenizer("tiny-gpt2")


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)  # the tiny tokenizer is cached and shared by other tests
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    return chat


def test_the_first_and_last_tokens_of_a_long_text_are_those_of_the_whole(tok):
    text = docs(60_000)
    whole = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for n in (1, 20, 129, 500):
        assert len(text) > text_bound(tok, n)  # the bounded path, not the whole text
        assert head_ids(tok, text, n) == whole["input_ids"][:n]
        ids, offsets = head_ids(tok, text, n, offsets=True)
        assert (ids, offsets) == (whole["input_ids"][:n], [tuple(o) for o in whole["offset_mapping"][:n]])
        assert tail_ids(tok, text, n) == whole["input_ids"][-n:]
    assert head_ids(tok, "short text", 100) == tok("short text", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("turns", ["", "chat"])
def test_a_long_example_encodes_to_the_same_tokens_without_being_tokenized_whole(tok, chat_tok, turns):
    response = docs(200_000)
    if turns:
        tokenizer = chat_tok
        text = ExampleText({"prompt": "Explain.", "response": response}, "prompt_response", "Explain.", response)
        turns = text.rendered(chat_tok, CHAT, {}).turns
    else:
        tokenizer = tok
    prompt = "Explain. " * 2_000  # a long prompt too: its last tokens lead into the response
    seen = Recording(tokenizer)
    got = encode_example(seen, prompt, response, 128, turns)
    assert max(seen.lengths) <= 2 * text_bound(tokenizer, 129)
    if turns:  # a rendering is cut at its tail
        want = encode_example(tokenizer, prompt, response, None, turns)
        want_ids, want_mask = want.input_ids[:128], want.loss_mask[:128]
    else:  # the plain rule: the end of a long prompt (half of max_length), then the start of the response
        want_ids = (tokenizer(prompt, add_special_tokens=False)["input_ids"][-64:]
                    + tokenizer(response, add_special_tokens=False)["input_ids"][:64])
        want_mask = [0] * 64 + [1] * 64
    assert (got.input_ids, got.loss_mask) == (want_ids, want_mask)
    assert encode_pairs(seen, [(prompt, response, turns)], 128)[0].input_ids == got.input_ids


def _fit(tokenizer, template, texts, too_long="cut", heldout=None):
    fitted = fit_examples(tokenizer, template, 128, too_long, texts, {}, None, heldout)
    return ([t.record for t in fitted.texts], fitted.context_tokens, fitted.loss_tokens, fitted.meta())


@pytest.mark.parametrize("template", [PLAIN, CHAT, "Q: {prompt}\nA: {response}"])
def test_ingest_cuts_a_long_record_as_the_whole_text_would_without_tokenizing_it_whole(tok, chat_tok, template,
                                                                                        monkeypatch):
    tokenizer = chat_tok if template == CHAT else tok
    records = [{"prompt": f"Explain part {i}.", "response": docs(chars)} for i, chars in
               enumerate((100, 5_000, 150_000))]
    records.append({"messages": [{"role": "user", "content": docs(90_000)},
                                 {"role": "assistant", "content": "A short answer after a long question."}]})
    texts = [ExampleText(r, fmt, *normalize(r, fmt, {})) for r, fmt in
             zip(records, ["prompt_response"] * 3 + ["messages"])]
    seen = Recording(tokenizer)
    bounded = _fit(seen, template, texts)
    # the longest text read: a prefix holding max_length + a turn's kept tokens (< 2 x (128 + margin)), doubled
    assert max(seen.lengths) <= 2 * text_bound(tokenizer, 2 * (128 + tokenize.BOUND_MARGIN_TOKENS) + 1) < 90_000
    monkeypatch.setattr(tokenize, "text_bound", lambda tokenizer, n: 1 << 40)  # every text tokenized whole
    monkeypatch.setattr("sftcurate.core.training_text.text_bound", lambda tokenizer, n: 1 << 40)
    assert bounded == _fit(tokenizer, template, texts)
    assert bounded[3]["too_long_cut"] == 2 and bounded[3]["too_long_dropped"] == 1  # the long question: dropped
    assert len(bounded[0]) == 3 and bounded[0][0] == records[0]


def test_a_long_held_out_record_stays_whole_and_counts_what_the_held_out_loss_reads(tok):
    response = docs(150_000)
    text = ExampleText({"prompt": "Explain.", "response": response}, "prompt_response", "Explain.", response)
    seen = Recording(tok)
    fitted = fit_examples(seen, PLAIN, 128, "cut", [text], {}, None, np.array([True]))
    assert max(seen.lengths) <= 2 * text_bound(tok, 129)
    assert fitted.texts[0].response == response and fitted.meta()["too_long_cut"] == 0
    read = encode_example(tok, "Explain.", response, 128)
    assert (fitted.context_tokens[0], fitted.loss_tokens[0]) == (128 - read.n_loss, read.n_loss)


def test_keep_still_counts_every_token_of_a_long_record(tok):
    response = docs(30_000)
    text = ExampleText({"response": response}, "prompt_response", "", response)
    fitted = fit_examples(tok, PLAIN, 128, "keep", [text], {})
    assert fitted.loss_tokens == [len(tok(response, add_special_tokens=False)["input_ids"])]  # + eos, - the first


def test_per_example_losses_on_loss_rows_in_chunks_equal_the_full_logits(monkeypatch):
    tiny = build_tiny_gpt2("tiny-gpt2")
    rows = [("Explain lists.", "Lists keep their order and grow."), ("", docs(400)), ("Why?", "Because.")]
    encoded = encode_pairs(tiny.tokenizer, rows, 64)
    ids, attn, labels = collate(encoded, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        target = labels[:, 1:]
        full = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100, reduction="none")
        monkeypatch.setattr(head_loss, "LOSS_ROWS_PER_CHUNK", 7)  # several chunks, one of them short
        sums, counts = row_loss_sums(tiny.model, ids, attn, labels)
    assert torch.equal(counts, (target != -100).sum(dim=1))
    assert torch.allclose(sums, full.sum(dim=1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [e.n_loss for e in encoded]


def _full_logits_loss(model, ids, attn, labels):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_loss_on_loss_rows_has_the_full_logits_loss_and_gradients(monkeypatch, mode):
    """LoRA freezes the head: the fused chunked pass (several chunks, one short) gives the loss and every
    trainable gradient of autograd over the whole batch's logits; a trained head takes the plain path, same loss."""
    from peft import LoraConfig, get_peft_model

    tiny = build_tiny_gpt2("tiny-gpt2")
    model = tiny.model if mode == "full" else get_peft_model(
        tiny.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], init_lora_weights=False))
    rows = [("Explain lists.", "Lists keep their order and grow."), ("", docs(400)), ("Why?", "Because.")]
    ids, attn, labels = collate(encode_pairs(tiny.tokenizer, rows, 64), tiny.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    assert head_loss.split_head(model)[0].weight.requires_grad == (mode == "full")

    expected = _full_logits_loss(model, ids, attn, labels)
    want = torch.autograd.grad(expected, params)
    monkeypatch.setattr(head_loss, "TRAIN_ROWS_PER_CHUNK", 7)
    got, n_tok = token_loss_sum(model, ids, attn, labels)
    grads = torch.autograd.grad(got, params)

    with torch.no_grad():
        unwatched, _ = token_loss_sum(model, ids, attn, labels)

    assert n_tok == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got, expected, rtol=1e-5) and torch.allclose(unwatched, expected, rtol=1e-5)
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
