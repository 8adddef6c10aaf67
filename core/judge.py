"""Pairwise LLM judge, done carefully (MT-Bench practice).

- The two texts appear under neutral labels ("Text 1" / "Text 2"); the judge never sees a method name.
- Every pair is judged in both orders; when the two orders disagree the prompt is a tie.
- Judge errors (unparseable answers, failed requests) are counted apart from ties and left out of the win rate.
- Position bias = how often slot 1 is picked among valid verdicts (0.5 is unbiased), reported with every result.
- Win rate of method A vs B: per prompt win = 1, tie = 0.5, loss = 0, averaged over prompts; a seeded
  bootstrap over prompts gives the confidence interval.

Backends (anything with `judge(prompt_text) -> Verdict`):
- `hf`: a local causal LM; the verdict comes from the next-token probabilities of "1" and "2" after the prompt.
  A 135M model (the built-in SmolLM2) is a weak judge: use it for smoke tests, not for conclusions.
- `openai`: any OpenAI-compatible /v1/chat/completions endpoint (vLLM, Ollama, a hosted API); temperature 0,
  timeouts, retries with exponential backoff on 429 / 5xx / timeouts, bounded concurrency. The API key comes
  from the environment only (SFTCURATE_JUDGE_API_KEY or OPENAI_API_KEY) and never reaches logs, MLflow,
  artifacts or reprs.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from sftcurate.core.config import JudgeConfig
from sftcurate.core.evaluate import load_generations
from sftcurate.core.judge_backends import (  # re-exported: the protocol and its backends
    WEAK_JUDGES, HFJudge, JudgeBackend, JudgeHTTPError, OpenAIJudge, Verdict, as_verdict, make_backend, parse_answer,
)
from sftcurate.data_contracts import JUDGMENTS, UserError
from sftcurate.data_contracts.manifests import JudgeSanityMeta, JudgmentsMeta
from sftcurate.infra import progress, tracking
from sftcurate.infra.stages import Built, build_once, read_meta
from sftcurate.infra.store import join, read_table

KIND = "judgments"

# ---------------------------------------------------------------- verdicts and backends


log = logging.getLogger("sftcurate.judge")


def judge_note(cfg: JudgeConfig) -> str | None:
    """A plain statement about the judge's strength for the report (None when nothing needs saying)."""
    if cfg.backend != "hf":
        return None
    spec = cfg.model or "builtin:smollm2-135m-instruct"
    return next((w for k, w in WEAK_JUDGES.items() if spec.startswith(k)),
                f"local judge '{spec}': check it ranks known good/bad pairs before trusting its win rates")


# ---------------------------------------------------------------- protocol

def build_prompt(template: str, prompt: str, text_1: str, text_2: str, domain: str = "this kind of text",
                 max_chars: int = 2000) -> str:
    """The judge's input: only the prompt and two anonymous texts ("Text 1", "Text 2")."""
    return template.format(prompt=prompt.strip() or "(no prompt)", text_1=text_1[:max_chars].strip() or "(empty)",
                           text_2=text_2[:max_chars].strip() or "(empty)", domain=domain)


def judge_pairs(backend, gens_a: pa.Table, gens_b: pa.Table, method_a: str, method_b: str,
                cfg: JudgeConfig | None = None) -> pa.Table:
    """Judge every shared prompt in both orders; returns the JUDGMENTS table (2 rows per prompt)."""
    cfg = cfg or JudgeConfig()
    a = {r["prompt_id"]: r for r in gens_a.to_pylist()}
    b = {r["prompt_id"]: r for r in gens_b.to_pylist()}
    shared = sorted(set(a) & set(b))
    if not shared:
        raise UserError(f"judge: the generations of '{method_a}' and '{method_b}' share no prompt; "
                        "generate both from the same examples artifact")
    jobs = []
    for pid in shared:
        prompt = a[pid]["prompt"]
        jobs.append((pid, "ab", build_prompt(cfg.template, prompt, a[pid]["text"], b[pid]["text"], cfg.domain,
                                             cfg.max_chars)))
        jobs.append((pid, "ba", build_prompt(cfg.template, prompt, b[pid]["text"], a[pid]["text"], cfg.domain,
                                             cfg.max_chars)))

    judged = itertools.count(1)

    def one(job):
        try:
            return as_verdict(backend.judge(job[2]))
        except Exception as exc:  # a backend bug must not turn into a silent tie
            return Verdict("error", None, f"{type(exc).__name__}: {exc}"[:300])
        finally:
            progress.step("judge", next(judged), len(jobs), unit="verdicts")

    workers = max(1, int(getattr(backend, "concurrency", 1) or 1))
    if workers == 1:
        verdicts = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = list(pool.map(one, jobs))
    rows = {k: [] for k in JUDGMENTS.schema.names}
    for (pid, order, _), v in zip(jobs, verdicts):
        choice = v.choice if v.choice in ("first", "second") else "error"
        if choice == "error":
            winner = "error"
        else:
            a_first = order == "ab"
            winner = method_a if (choice == "first") == a_first else method_b
        rows["prompt_id"].append(pid)
        rows["method_a"].append(method_a)
        rows["method_b"].append(method_b)
        rows["order"].append(order)
        rows["verdict"].append(choice)
        rows["winner"].append(winner)
        rows["p_first"].append(v.p_first)
        rows["error"].append(v.error if choice == "error" else None)
        rows["chars_a"].append(len(a[pid]["text"]))
        rows["chars_b"].append(len(b[pid]["text"]))
    return pa.table(rows)


def prompt_scores(rows: list[dict]) -> tuple[dict[str, float], int]:
    """Per prompt: 1 (A wins in both orders), 0 (B wins in both), 0.5 (orders disagree); errors left out.
    `rows` are the judgments as dicts (`table.to_pylist()`)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    scores, errors = {}, 0
    for pid, rs in by_prompt.items():
        if any(r["verdict"] == "error" for r in rs) or len(rs) != 2:
            errors += 1
            continue
        winners = {r["winner"] for r in rs}
        if len(winners) == 2:
            scores[pid] = 0.5
        else:
            scores[pid] = 1.0 if winners.pop() == rs[0]["method_a"] else 0.0
    return scores, errors


def length_bias(rows: list[dict], scores: dict[str, float]) -> float:
    """Of the prompts with a decisive verdict (same winner in both orders) and texts of different lengths, the
    share the longer text won. Judges are known to favour length; near 1 says a win rate may reward verbosity
    rather than content. NaN when no prompt qualifies."""
    lengths = {r["prompt_id"]: (r["chars_a"], r["chars_b"]) for r in rows}
    longer_won = [(s == 1.0) == (lengths[pid][0] > lengths[pid][1]) for pid, s in scores.items()
                  if s != 0.5 and lengths[pid][0] != lengths[pid][1]]
    return float(np.mean(longer_won)) if longer_won else float("nan")


def length_controlled_win_rate(rows: list[dict], ridge: float = 0.1) -> float:
    """AlpacaEval-2-style length control (Dubois et al., 2024): a logistic regression of every valid verdict
    (did method A win it?) on an intercept, A's slot (+1 first, -1 second) and tanh of the length difference
    (A - B, over its root mean square), with a small L2 ridge so a judge that follows length or position
    perfectly still gives finite weights (which then shrinks the correction a little). The result is
    P(A wins) at equal length, averaged over both slots. A verdict-level rate (ties are not 0.5 here): compare it
    with 0.5 and with the raw win rate, not as a drop-in for it. NaN without valid verdicts."""
    rows = [r for r in rows if r["verdict"] != "error"]
    if not rows:
        return float("nan")
    diff = np.array([r["chars_a"] - r["chars_b"] for r in rows], dtype=float)
    scale = float(np.sqrt(np.mean(diff ** 2))) or 1.0
    slot = np.array([1.0 if r["order"] == "ab" else -1.0 for r in rows])
    x = np.column_stack([np.ones(len(rows)), slot, np.tanh(diff / scale)])
    y = np.array([1.0 if r["winner"] == r["method_a"] else 0.0 for r in rows])
    penalty = ridge * np.eye(3)
    w = np.zeros(3)
    for _ in range(100):  # Newton's method on a strictly convex objective
        p = 1 / (1 + np.exp(-x @ w))
        step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + penalty, x.T @ (p - y) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(np.mean(1 / (1 + np.exp(-(w[0] + w[1] * np.array([1.0, -1.0]))))))


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarize(judgments: pa.Table, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Win rate of method A vs B with a prompt-bootstrap CI, win/loss/tie/error counts, position bias, length
    bias and the length-controlled win rate."""
    rows = judgments.to_pylist()
    scores, errors = prompt_scores(rows)
    values = np.array(list(scores.values()), dtype=float)
    verdicts = judgments.column("verdict").to_pylist()
    valid = [v for v in verdicts if v != "error"]
    lo, hi = bootstrap_ci(values, n_bootstrap, seed)
    p = judgments.column("p_first").to_pylist()
    p = [x for x in p if x is not None]
    return {
        "win_rate": float(values.mean()) if len(values) else float("nan"),
        "ci_low": lo, "ci_high": hi,
        "wins": int((values == 1.0).sum()), "losses": int((values == 0.0).sum()), "ties": int((values == 0.5).sum()),
        "errors": errors, "prompts": len(scores) + errors,
        "verdict_errors": len(verdicts) - len(valid),
        "position_bias": (sum(v == "first" for v in valid) / len(valid)) if valid else float("nan"),
        "mean_p_first": float(np.mean(p)) if p else None,
        "longer_won": length_bias(rows, scores),
        "lc_win_rate": length_controlled_win_rate(rows),
        "mean_chars_a": float(np.mean(judgments.column("chars_a").to_numpy())) if judgments.num_rows else None,
        "mean_chars_b": float(np.mean(judgments.column("chars_b").to_numpy())) if judgments.num_rows else None,
    }


# ---------------------------------------------------------------- committed judgments

def run_judge(gens_a_uri: str, gens_b_uri: str, method_a: str, method_b: str, cfg: JudgeConfig, seed: int = 0,
              run_id: str | None = None, store_root: str | None = None, backend=None) -> Built:
    """Judge A's generations against B's (e.g. a method vs uniform) and commit the judgments artifact."""
    def build(writer) -> None:
        judge = backend or make_backend(cfg)
        table = judge_pairs(judge, load_generations(gens_a_uri), load_generations(gens_b_uri), method_a,
                            method_b, cfg)
        summary = summarize(table, cfg.n_bootstrap, seed)
        if summary["prompts"] and summary["errors"] == summary["prompts"]:
            first = next(e for e in table.column("error").to_pylist() if e)
            raise RuntimeError(f"judge: every judgment failed ({summary['verdict_errors']} errors), e.g. {first}")
        if summary["errors"]:
            log.warning("judge: %d of %d prompts had a judge error (left out of the win rate)",
                        summary["errors"], summary["prompts"])
        writer.write_table("judgments.parquet", table, JUDGMENTS)
        writer.meta.update({"summary": summary, "method_a": method_a, "method_b": method_b,
                            "generations_a": gens_a_uri, "generations_b": gens_b_uri, "judge": cfg.identity(),
                            "backend": repr(judge), "note": judge_note(cfg),
                            "requests": getattr(judge, "requests", None),
                            "retries": getattr(judge, "retries", None)})

    uri = build_once(KIND, __name__, {"method_a": method_a, "method_b": method_b, "judge": cfg.identity(),
                                      "seed": seed}, build,
                     upstream={"generations_a": gens_a_uri, "generations_b": gens_b_uri}, store_root=store_root,
                     meta=JudgmentsMeta)
    summary = read_meta(uri, JudgmentsMeta).summary
    if run_id:
        # the manifest is strict JSON: a summary value with no number behind it (NaN) reads back as None
        tracking.log_metrics(run_id, {f"judge/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    return uri


SANITY_KIND = "judge_sanity"
TRUSTED_ACCURACY = 0.8   # below this, a win rate from this judge is not evidence


def degraded(references: list[str], i: int, rng: np.random.Generator) -> str:
    """A worse text for prompt i whose better side is known: another prompt's reference, the reference cut to
    its first third, or its words shuffled (one kind after the other)."""
    words = references[i].split()
    kind = i % 3
    if kind == 0 and len(references) > 1:
        return references[(i + 1) % len(references)]
    if kind == 1 and len(words) > 3:
        return " ".join(words[: len(words) // 3])
    return " ".join(words[j] for j in rng.permutation(len(words))) if len(words) > 1 else references[i][::-1]


def judge_sanity(gens_uri: str, cfg: JudgeConfig, seed: int = 0, store_root: str | None = None,
                 backend=None) -> Built:
    """Before any win rate: the judge on pairs whose better side is known (each held-out prompt's reference
    continuation against a degraded one), both orders. Accuracy = share of valid prompts where the reference
    won in both orders; with position bias it says whether this judge's win rates can be trusted."""
    def build(writer) -> None:
        gens = load_generations(gens_uri)
        references = gens.column("reference").to_pylist()
        rng = np.random.default_rng(seed)
        good = gens.set_column(gens.schema.get_field_index("text"), "text", pa.array(references))
        bad = gens.set_column(gens.schema.get_field_index("text"), "text",
                              pa.array([degraded(references, i, rng) for i in range(len(references))]))
        table = judge_pairs(backend or make_backend(cfg), good, bad, "reference", "degraded", cfg)
        summary = summarize(table, cfg.n_bootstrap, seed)
        valid = summary["prompts"] - summary["errors"]
        accuracy = summary["wins"] / valid if valid else float("nan")
        writer.write_table("judgments.parquet", table, JUDGMENTS)
        writer.meta.update({"accuracy": accuracy, "pairs": summary["prompts"], "errors": summary["errors"],
                            "position_bias": summary["position_bias"], "trusted": bool(accuracy >= TRUSTED_ACCURACY),
                            "threshold": TRUSTED_ACCURACY, "judge": cfg.identity(), "summary": summary})

    return build_once(SANITY_KIND, __name__, {"judge": cfg.identity(), "seed": seed}, build,
                      upstream={"generations": gens_uri}, store_root=store_root, meta=JudgeSanityMeta)


def load_judgments(uri: str) -> tuple[pa.Table, JudgmentsMeta]:
    return read_table(join(uri, "judgments.parquet"), JUDGMENTS), read_meta(uri, JudgmentsMeta)


__all__ = ["WEAK_JUDGES", "HFJudge", "JudgeBackend", "JudgeHTTPError", "OpenAIJudge", "Verdict", "as_verdict",
           "make_backend", "parse_answer", "JudgeConfig", "judge_pairs", "summarize", "run_judge", "load_judgments",
           "judge_note", "build_prompt", "judge_sanity", "TRUSTED_ACCURACY"]
