"""Judge backends: anything with `judge(prompt_text) -> Verdict` can judge a pair.

- `HFJudge`: a local causal LM; the verdict comes from the next-token probabilities of "1" and "2".
- `OpenAIJudge`: any OpenAI-compatible /v1/chat/completions endpoint; temperature 0, timeouts, retries with
  exponential backoff on 429 / 5xx / timeouts, bounded concurrency; the verdict is the answer text, and the
  probability of slot 1 comes from the answer token's logprobs where the endpoint returns them. The API key
  comes from the environment only and never reaches logs, MLflow, artifacts or reprs.
"""
from __future__ import annotations

import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import httpx
import torch

from sftcurate.core.config import ENV_BASE_URL, ENV_KEYS, ENV_MODEL, JudgeConfig
from sftcurate.data_contracts import UserError
from sftcurate.infra.models import default_device, resolve_model

WEAK_JUDGES = {
    "builtin:smollm2-135m-instruct": "a 135M-parameter judge (SmolLM2-135M) is weak: its preferences barely beat "
                                     "chance, so read these win rates as a smoke test, not as evidence; point the "
                                     "judge at a strong model (judge.backend: openai)",
    "tiny-gpt2": "the judge is a randomly initialised test model: these win rates carry no information",
}


@dataclass
class Verdict:
    choice: str                   # "first" | "second" | "error"
    p_first: float | None = None  # probability of slot 1 where the backend gives one
    error: str | None = None


class JudgeBackend(Protocol):
    concurrency: int

    def judge(self, prompt_text: str) -> Verdict | tuple:  # pragma: no cover - protocol
        ...


def as_verdict(out) -> Verdict:
    if isinstance(out, Verdict):
        return out
    if isinstance(out, str):
        return Verdict(out)
    choice, *rest = out
    return Verdict(choice, rest[0] if rest else None, rest[1] if len(rest) > 1 else None)


_ANSWER = re.compile(r"(?<![0-9])([12])(?![0-9])")


def parse_answer(text: str) -> Verdict:
    """'1' / 'Text 2' / 'The answer is 1.' -> a verdict; anything else is an error (never a tie)."""
    found = set(_ANSWER.findall(text or ""))
    if len(found) == 1:
        return Verdict("first" if found == {"1"} else "second")
    return Verdict("error", error=f"unparseable judge answer: {text[:80]!r}")


def answer_probability(logprobs) -> float | None:
    """P("1") / (P("1") + P("2")) from the first answer token's top logprobs (OpenAI / vLLM shape:
    logprobs.content[0].top_logprobs = [{token, logprob}, ...]); None when absent or neither digit is listed."""
    try:
        top = logprobs["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    p = {"1": 0.0, "2": 0.0}
    for entry in top or []:
        token = str(entry.get("token", "")).strip()
        if token in p and isinstance(entry.get("logprob"), (int, float)):
            p[token] += math.exp(entry["logprob"])
    total = p["1"] + p["2"]
    return p["1"] / total if total > 0 else None


class HFJudge:
    """A local causal LM; compares the next-token probabilities of "1" and "2" after the prompt."""

    concurrency = 1

    def __init__(self, spec: str = "builtin:smollm2-135m-instruct"):
        self.spec = spec
        loaded = resolve_model(spec, device=default_device())
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.model.eval()
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.ids = [self._token_id("1" if chat else " 1"), self._token_id("2" if chat else " 2")]
        self.warning = next((w for k, w in WEAK_JUDGES.items() if spec.startswith(k)), None)
        self._lock = threading.Lock()

    def _token_id(self, s: str) -> int:
        ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
        return ids[-1]

    def _encode(self, prompt_text: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt_text + "\nAnswer:", add_special_tokens=False)["input_ids"]

    def judge(self, prompt_text: str) -> Verdict:
        ids = self._encode(prompt_text)
        limit = getattr(self.model.config, "n_positions", None) or getattr(self.model.config,
                                                                           "max_position_embeddings", None)
        if limit and len(ids) > limit:
            ids = ids[-limit:]
        with self._lock, torch.no_grad():
            device = next(self.model.parameters()).device
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
        pair = torch.softmax(logits[self.ids], dim=0)
        p_first = float(pair[0])
        if not math.isfinite(p_first):
            return Verdict("error", None, "non-finite judge probabilities")
        return Verdict("first" if p_first >= 0.5 else "second", p_first)

    def __repr__(self) -> str:
        return f"HFJudge(spec={self.spec!r})"


class JudgeHTTPError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status of a refused request; None for give-ups and bad bodies


class OpenAIJudge:
    """An OpenAI-compatible chat completions endpoint. The key lives only in a header, never in repr or logs."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 1.0, concurrency: int = 4, max_tokens: int = 4,
                 logprobs: bool = True):
        if not base_url:
            raise UserError(f"judge.base_url: not set; set it in the config or ${ENV_BASE_URL} "
                            "(e.g. http://localhost:8000/v1)")
        if not model:
            raise UserError(f"judge.model: not set; set it in the config or ${ENV_MODEL}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.logprobs = logprobs  # switched off for good if the endpoint refuses the parameter
        self.requests = 0
        self.retries = 0
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._stats_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: JudgeConfig) -> "OpenAIJudge":
        key = next((os.environ[k] for k in ENV_KEYS if os.environ.get(k)), None)
        return cls(cfg.base_url or os.environ.get(ENV_BASE_URL, ""), cfg.model or os.environ.get(ENV_MODEL, ""),
                   key, cfg.timeout_s, cfg.max_retries, cfg.backoff_s, cfg.concurrency, logprobs=cfg.logprobs)

    def __repr__(self) -> str:
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

    def _post(self, body: dict) -> dict:
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._stats_lock:
                    self.retries += 1
                delay = self.backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
                time.sleep(min(delay, 60.0))
            with self._stats_lock:
                self.requests += 1
            try:
                r = self._client.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__} from {url}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code} from {url}"
                retry_after = r.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(float(retry_after), 30.0))
                continue
            if r.status_code >= 400:
                raise JudgeHTTPError(f"HTTP {r.status_code} from {url}: {r.text[:200]}", r.status_code)
            try:
                return r.json()
            except ValueError:
                raise JudgeHTTPError(f"non-JSON answer from {url}") from None
        raise JudgeHTTPError(f"gave up after {self.max_retries + 1} attempts: {last}")

    def judge(self, prompt_text: str) -> Verdict:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": prompt_text}]}
        try:
            if self.logprobs:
                try:
                    data = self._post({**body, "logprobs": True, "top_logprobs": 5})
                except JudgeHTTPError as exc:
                    if not (exc.status == 400 and "logprob" in str(exc).lower()):
                        raise
                    self.logprobs = False  # e.g. a server without logprobs support: plain answers from now on
                    data = self._post(body)
            else:
                data = self._post(body)
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
        except JudgeHTTPError as exc:
            return Verdict("error", None, str(exc))
        except (KeyError, IndexError, TypeError):
            return Verdict("error", None, "malformed chat completion (no choices[0].message.content)")
        verdict = parse_answer(content)
        if verdict.choice != "error":
            verdict.p_first = answer_probability(choice.get("logprobs"))
        return verdict

    def close(self) -> None:
        self._client.close()


_HF_JUDGES: dict[str, HFJudge] = {}
_HF_LOCK = threading.Lock()


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIJudge.from_config(cfg)
    spec = cfg.model or "builtin:smollm2-135m-instruct"
    with _HF_LOCK:  # one loaded judge per process, reused by every cell of a comparison
        if spec not in _HF_JUDGES:
            _HF_JUDGES[spec] = HFJudge(spec)
        return _HF_JUDGES[spec]
