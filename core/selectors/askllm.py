"""Ask-LLM (Sachdeva et al., 2024): ask a model whether an example is informative, keep the most likely "yes".

score(i) = P(yes) / (P(yes) + P(no)) from the next-token distribution after the Ask-LLM prompt, where P(yes)
sums the probabilities of the first tokens of " yes", "yes", " Yes", "Yes" (and likewise for no; a token
shared by both sides is dropped). Scoring is batched (length-grouped, right-padded, the distribution read at
each row's last real position) under inference_mode. The selector keeps the highest scores (ties: lowest
index) while they fit the budget.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from sftcurate.core.selectors.base import (DEVICE_HELP, EXAMPLES, MODEL, Budget, Selector, SelectionResult,
                                          SelectorInputs, SelectorParams, fill_in_order, register)
from sftcurate.core.tokenize import length_grouped_batches
from sftcurate.infra.models import resolve_device, resolve_model

PROMPT_HEAD = "###\n"
PROMPT_TAIL = ("\n###\nDoes the previous paragraph demarcated within ### and ### contain informative signal for "
               "fine-tuning a large-language model? An informative datapoint should be well-formatted, contain "
               "some usable knowledge of the world, and strictly NOT have any harmful, racist, sexist, etc. "
               "content.\nOPTIONS:\n- yes\n- no\nANSWER:")


def askllm_prompt(example: str) -> str:
    return PROMPT_HEAD + example + PROMPT_TAIL


def example_text(prompt: str, response: str) -> str:
    return f"{prompt}\n{response}" if prompt else response


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    def first(words):
        out = []
        for w in words:
            ids = tokenizer(w, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in out:
                out.append(ids[0])
        return out

    yes, no = first([" yes", "yes", " Yes", "Yes"]), first([" no", "no", " No", "No"])
    shared = set(yes) & set(no)
    yes, no = [t for t in yes if t not in shared], [t for t in no if t not in shared]
    if not yes or not no:
        raise ValueError("askllm: the tokenizer has no distinct first tokens for 'yes' and 'no'")
    return yes, no


def encode_prompt(tokenizer, example: str, max_length: int) -> list[int]:
    """Prompt ids; the example (never the instructions) is cut so the whole prompt fits max_length."""
    head = tokenizer(PROMPT_HEAD, add_special_tokens=False)["input_ids"]
    tail = tokenizer(PROMPT_TAIL, add_special_tokens=False)["input_ids"]
    body = tokenizer(example, add_special_tokens=False)["input_ids"]
    room = max(max_length - len(head) - len(tail), 1)
    return head + body[:room] + tail


def askllm_scores(model, tokenizer, texts: list[str], batch_tokens: int = 4096, max_length: int = 512,
                  device=None) -> np.ndarray:
    """P(yes | Ask-LLM prompt) normalised over yes/no, float64 [len(texts)]."""
    device = device or next(model.parameters()).device
    yes, no = answer_token_ids(tokenizer)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_pos:
        max_length = min(max_length, int(n_pos))
    encoded = [encode_prompt(tokenizer, t, max_length) for t in texts]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.zeros(len(texts), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for batch in length_grouped_batches(lengths, batch_tokens):
            width = int(lengths[batch].max())
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :lengths[i]] = torch.tensor(encoded[i])
                attn[r, :lengths[i]] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            last = torch.as_tensor(lengths[batch] - 1, device=logits.device)
            lp = torch.log_softmax(logits[torch.arange(len(batch), device=logits.device), last].float(), dim=-1)
            ly = torch.logsumexp(lp[:, yes], dim=-1)
            ln = torch.logsumexp(lp[:, no], dim=-1)
            out[batch] = torch.sigmoid(ly - ln).double().cpu().numpy()
    return out


class AskLLMParams(SelectorParams):
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per scoring batch")
    max_length: int = Field(512, gt=8, description="max prompt tokens per scored example")
    device: str = Field("auto", description=DEVICE_HELP)


@register
class AskLLMSelector(Selector):
    """Ask-LLM: keep the examples a model most likely calls informative (needs --model and --examples)."""

    name = "askllm"
    requires = (EXAMPLES, MODEL)
    Params = AskLLMParams

    def select(self, inputs: SelectorInputs, budget: Budget, seed: int) -> SelectionResult:
        if not inputs.model_spec:
            raise ValueError("askllm: no model spec (requirement 'model')")
        device = resolve_device(self.params.device)
        loaded = resolve_model(inputs.model_spec, device=device)
        texts = [example_text(p, r) for p, r in zip(inputs.pool.column("prompt").to_pylist(),
                                                     inputs.pool.column("response").to_pylist())]
        scores = askllm_scores(loaded.model, loaded.tokenizer, texts, self.params.batch_tokens,
                               self.params.max_length, device)
        order = np.lexsort((np.arange(len(scores)), -scores))   # highest score first, lowest index on ties
        picks = fill_in_order(order, inputs.token_counts, budget)
        return SelectionResult(indices=picks, scores=[float(scores[i]) for i in picks],
                               info={"model": inputs.model_spec, "mean_score": float(scores.mean()) if len(scores) else None})
