"""Pairwise judge protocol: neutral labels, both orders, ties vs errors, position bias, bootstrap CI, and the
OpenAI-compatible backend end to end against a local HTTP server (retries, concurrency, the key kept secret)."""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sftcurate.data_contracts import GENERATIONS
from sftcurate.infra import tracking
from sftcurate.infra.store import ArtifactStore, read_manifest
from sftcurate.core.judge import (
    HFJudge, JudgeConfig, OpenAIJudge, Verdict, bootstrap_ci, judge_note, judge_pairs, load_judgments, parse_answer,
    run_judge, summarize,
)

SECRET = "sk-test-DO-NOT-LEAK-4f9a2c"
METHOD_A, METHOD_B = "fishersft_method_name", "uniform_method_name"


def gens(texts: dict[str, str], prompt: str = "Explain Python lists") -> pa.Table:
    ids = sorted(texts)
    return pa.table({"prompt_id": ids, "prompt": [f"{prompt} {i}" for i in ids], "reference": ["ref"] * len(ids),
                     "text": [texts[i] for i in ids]})


def commit_gens(name: str, table: pa.Table) -> str:
    w = ArtifactStore().begin("generations", name)
    w.write_table("generations.parquet", table, GENERATIONS)
    return w.commit()


class AlwaysFirst:
    concurrency = 1

    def __init__(self):
        self.prompts: list[str] = []

    def judge(self, prompt_text):
        self.prompts.append(prompt_text)
        return ("first", 0.9, None)


class PrefersGood:
    """Picks the slot whose text contains GOOD; errors on prompts whose text says BROKEN."""

    concurrency = 2

    def judge(self, prompt_text):
        if "BROKEN" in prompt_text:
            return Verdict("error", None, "judge timed out")
        t1 = prompt_text.split("Text 1:")[1].split("Text 2:")[0]
        return Verdict("first" if "GOOD" in t1 else "second")


def test_always_first_judge_is_all_ties_with_full_position_bias():
    a = gens({f"p{i}": f"alpha text {i}" for i in range(10)})
    b = gens({f"p{i}": f"beta text {i}" for i in range(10)})
    backend = AlwaysFirst()
    table = judge_pairs(backend, a, b, METHOD_A, METHOD_B)
    assert table.num_rows == 20 and sorted(set(table.column("order").to_pylist())) == ["ab", "ba"]
    s = summarize(table, seed=0)
    assert s["position_bias"] == 1.0 and s["win_rate"] == 0.5 and s["ties"] == 10
    assert s["wins"] == s["losses"] == s["errors"] == 0 and s["ci_low"] == s["ci_high"] == 0.5
    # the judge only ever saw neutral labels, never a method name
    assert len(backend.prompts) == 20
    for p in backend.prompts:
        assert "Text 1" in p and "Text 2" in p
        assert not re.search(r"fishersft|uniform|method", p, re.IGNORECASE)
    # each text appears in slot 1 once and in slot 2 once
    firsts = [p.split("Text 1:")[1].split("Text 2:")[0].strip() for p in backend.prompts]
    assert sorted(firsts) == sorted([f"alpha text {i}" for i in range(10)] + [f"beta text {i}" for i in range(10)])


def test_errors_are_counted_apart_from_ties_and_win_rate_uses_valid_prompts():
    a = gens({"p0": "GOOD one", "p1": "GOOD two", "p2": "GOOD BROKEN", "p3": "GOOD three"})
    b = gens({"p0": "meh", "p1": "meh", "p2": "meh", "p3": "meh"})
    table = judge_pairs(PrefersGood(), a, b, METHOD_A, METHOD_B)
    s = summarize(table, seed=0)
    assert s["errors"] == 1 and s["ties"] == 0 and s["wins"] == 3 and s["win_rate"] == 1.0
    assert s["verdict_errors"] == 2 and s["position_bias"] == 0.5  # slot 1 picked in 3 of 6 valid verdicts
    rows = table.to_pylist()
    assert {r["winner"] for r in rows if r["prompt_id"] == "p2"} == {"error"}
    assert all(r["error"] for r in rows if r["verdict"] == "error")


class PrefersLonger:
    concurrency = 1

    def judge(self, prompt_text):
        t1, t2 = prompt_text.split("Text 1:")[1].split("Text 2:")
        return Verdict("first" if len(t1.strip()) > len(t2.split("\n\n")[0].strip()) else "second")


def test_length_bias_is_reported():
    # A writes the longer text on p0-p2 and the shorter one on p3-p5; GOOD marks the content a judge should like
    a = gens({"p0": "x" * 40, "p1": "GOOD" + "x" * 36, "p2": "x" * 40, "p3": "y", "p4": "GOOD", "p5": "y"})
    b = gens({"p0": "GOOD", "p1": "z", "p2": "z", "p3": "GOOD" + "w" * 36, "p4": "w" * 40, "p5": "w" * 40})
    verbose = summarize(judge_pairs(PrefersLonger(), a, b, METHOD_A, METHOD_B))
    assert verbose["longer_won"] == 1.0 and verbose["win_rate"] == 0.5 and verbose["ties"] == 0
    content = summarize(judge_pairs(PrefersGood(), a, b, METHOD_A, METHOD_B))
    # the content judge: p2 and p5 have no GOOD (orders disagree: ties); of the 4 decisive prompts the longer
    # text won p1 and p3 and lost p0 and p4
    assert content["longer_won"] == 0.5 and (content["wins"], content["losses"], content["ties"]) == (2, 2, 2)
    assert verbose["mean_chars_a"] == pytest.approx((3 * 40 + 2 + 4) / 6)
    same = summarize(judge_pairs(AlwaysFirst(), a, b, METHOD_A, METHOD_B))
    assert math.isnan(same["longer_won"])  # only ties: no decisive prompt to measure on


def test_length_controlled_win_rate():
    rng = np.random.default_rng(0)
    n = 40
    # a judge that only follows length, and method A writes the longer text on 80% of the prompts
    longer = rng.random(n) < 0.8
    a = gens({f"p{i}": "a" * (120 if longer[i] else 20) for i in range(n)})
    b = gens({f"p{i}": "b" * 70 for i in range(n)})
    verbose = summarize(judge_pairs(PrefersLonger(), a, b, METHOD_A, METHOD_B))
    assert verbose["win_rate"] == pytest.approx(longer.mean())
    assert verbose["lc_win_rate"] < verbose["win_rate"] - 0.1  # the "win" is length: pulled towards 0.5
    # a judge that follows content (GOOD on 70% of A's texts), lengths independent of the method
    good = rng.random(n) < 0.7
    la, lb = rng.integers(10, 200, n), rng.integers(10, 200, n)
    a = gens({f"p{i}": ("GOOD " if good[i] else "") + "a" * la[i] for i in range(n)})
    b = gens({f"p{i}": ("" if good[i] else "GOOD ") + "b" * lb[i] for i in range(n)})
    content = summarize(judge_pairs(PrefersGood(), a, b, METHOD_A, METHOD_B))
    assert content["win_rate"] == pytest.approx(good.mean())
    assert content["lc_win_rate"] == pytest.approx(content["win_rate"], abs=0.05)
    # position alone carries no preference: exactly 0.5
    same = summarize(judge_pairs(AlwaysFirst(), a, b, METHOD_A, METHOD_B))
    assert same["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = np.array([1.0] * 12 + [0.0] * 6 + [0.5] * 2)
    lo, hi = bootstrap_ci(values, 2000, seed=7)
    assert (lo, hi) == bootstrap_ci(values, 2000, seed=7)
    assert lo < values.mean() < hi and 0.0 <= lo and hi <= 1.0


def test_parse_answer():
    assert parse_answer("1").choice == "first"
    assert parse_answer("Text 2 is better.").choice == "second"
    assert parse_answer("1 or 2? I cannot say").choice == "error"
    assert parse_answer("").choice == "error"
    assert parse_answer("12").choice == "error"


def test_template_validation_and_judge_notes():
    with pytest.raises(ValueError, match="text_2"):
        JudgeConfig(template="Compare {text_1} only")
    custom = JudgeConfig(template="Domain {domain}. P: {prompt}\nA: {text_1}\nB: {text_2}\nPick 1 or 2.",
                         domain="Python docs")
    assert "Python docs" in custom.template.format(prompt="", text_1="", text_2="", domain="Python docs")
    assert "135M" in judge_note(JudgeConfig(backend="hf"))
    assert judge_note(JudgeConfig(backend="openai")) is None


def test_hf_judge_scores_answer_tokens():
    judge = HFJudge("tiny-gpt2")
    v = judge.judge("Prompt:\nx\n\nText 1:\nhello\n\nText 2:\nworld\n\nAnswer with 1 or 2.")
    assert v.choice in ("first", "second") and 0.0 < v.p_first < 1.0
    assert judge.warning and "no information" in judge.warning


# ---------------------------------------------------------------- OpenAI-compatible backend, end to end

class ChatServer:
    """A chat-completions endpoint on 127.0.0.1: fails the first requests (429, 500, a timeout), then answers
    with the slot that holds GOOD. Records auth headers and the peak number of requests in flight."""

    def __init__(self, failures=(429, 500, "slow"), logprobs: bool = True):
        self.failures = list(failures)
        self.logprobs = logprobs  # False: refuse requests that ask for logprobs, like a server without them
        self.lock = threading.Lock()
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.peak = 0
        self.statuses: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.auth.add(self.headers.get("Authorization", ""))
                    server.bodies.append(body)
                    failure = server.failures.pop(0) if server.failures else None
                    server.statuses.append(failure or 200)
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if failure == "slow":
                        # the client gives up after its timeout and retries while this handler still sleeps;
                        # an abandoned request is not one the client holds open, so it leaves the count
                        with server.lock:
                            server.in_flight -= 1
                        time.sleep(3.0)
                        with server.lock:
                            server.in_flight += 1
                        return self._send(200, {"choices": [{"message": {"content": "1"}}]})
                    if failure is not None:
                        return self._send(failure, {"error": {"message": "try again"}})
                    if body.get("logprobs") and not server.logprobs:
                        return self._send(400, {"error": {"message": "logprobs is not supported"}})
                    time.sleep(0.05)
                    content = body["messages"][0]["content"]
                    t1 = content.split("Text 1:")[1].split("Text 2:")[0]
                    answer = "1" if "GOOD" in t1 else "2"
                    choice = {"message": {"role": "assistant", "content": answer}}
                    if body.get("logprobs"):
                        other = "2" if answer == "1" else "1"
                        top = [{"token": answer, "logprob": math.log(0.8)}, {"token": " the", "logprob": -3.0},
                               {"token": other, "logprob": math.log(0.2)}][: body["top_logprobs"]]
                        choice["logprobs"] = {"content": [{"token": answer, "logprob": math.log(0.8),
                                                           "top_logprobs": top}]}
                    return self._send(200, {"choices": [choice]})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_openai_backend_end_to_end_with_retries_and_secret_key(store_root, monkeypatch, caplog, capsys):
    monkeypatch.setenv("SFTCURATE_JUDGE_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    a_uri = commit_gens("a", gens({f"p{i}": f"GOOD answer {i}" for i in range(6)}))
    b_uri = commit_gens("b", gens({f"p{i}": f"plain answer {i}" for i in range(6)}))
    with ChatServer() as server:
        monkeypatch.setenv("SFTCURATE_JUDGE_BASE_URL", server.url)
        monkeypatch.setenv("SFTCURATE_JUDGE_MODEL", "judge-model-x")
        cfg = JudgeConfig(backend="openai", timeout_s=1.5, backoff_s=0.01, max_retries=4, concurrency=3)
        backend = OpenAIJudge.from_config(cfg)
        assert SECRET not in repr(backend) and SECRET not in repr(cfg) and SECRET not in cfg.model_dump_json()
        with tracking.start_run("judge-test") as run_id:
            uri = run_judge(a_uri, b_uri, METHOD_A, METHOD_B, cfg, seed=0, run_id=run_id, backend=backend)
            tracking.log_params(run_id, {"judge": cfg.identity()})
    table, meta = load_judgments(uri)
    s = meta.summary
    assert s["win_rate"] == 1.0 and s["wins"] == 6 and s["errors"] == 0 and s["position_bias"] == 0.5
    assert s["ci_low"] == 1.0
    assert table.num_rows == 12
    # P(slot 1) from the answer token's logprobs: 0.8 where GOOD is in slot 1 (order ab), 0.2 otherwise
    p_first = dict(zip(zip(table.column("prompt_id").to_pylist(), table.column("order").to_pylist()),
                       table.column("p_first").to_pylist()))
    assert all(p == pytest.approx(0.8 if order == "ab" else 0.2) for (_, order), p in p_first.items())
    assert all(b.get("logprobs") is True and b["top_logprobs"] == 5 for b in server.bodies)
    # the 429, the 500 and the timed-out request were retried; every judgment still succeeded
    assert backend.retries >= 3 and backend.requests == 12 + backend.retries
    assert {429, 500, "slow"} <= set(server.statuses)
    assert server.auth == {f"Bearer {SECRET}"}  # the key reached the server ...
    assert 1 < server.peak <= 3  # bounded concurrency
    assert all(b["temperature"] == 0 and b["model"] == "judge-model-x" for b in server.bodies)
    for body in server.bodies:  # neutral labels only
        assert METHOD_A not in json.dumps(body) and METHOD_B not in json.dumps(body)
    # ... and nowhere else: artifacts, MLflow, logs, reprs
    assert SECRET.encode() not in _all_bytes(Path(store_root))
    run = tracking.client().get_run(run_id)
    assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert run.data.metrics["judge/win_rate"] == 1.0
    out = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in out.out + out.err
    assert SECRET not in json.dumps(read_manifest(uri))


def test_openai_backend_falls_back_when_the_server_refuses_logprobs():
    with ChatServer(failures=[], logprobs=False) as server:
        backend = OpenAIJudge(server.url, "m", None, timeout_s=5, max_retries=1, backoff_s=0.01, concurrency=1)
        table = judge_pairs(backend, gens({"p0": "GOOD x", "p1": "GOOD y"}), gens({"p0": "z", "p1": "w"}), "a", "b")
    s = summarize(table)
    assert s["wins"] == 2 and s["errors"] == 0 and s["mean_p_first"] is None
    assert backend.logprobs is False
    # one refused request, then only plain requests: the parameter is dropped for good
    assert [bool(b.get("logprobs")) for b in server.bodies] == [True, False, False, False, False]
    assert backend.requests == 5 and backend.retries == 0


def test_openai_backend_gives_up_as_errors_not_ties(monkeypatch):
    monkeypatch.delenv("SFTCURATE_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ChatServer(failures=[503] * 100) as server:
        backend = OpenAIJudge(server.url, "m", None, timeout_s=2, max_retries=2, backoff_s=0.01, concurrency=2)
        table = judge_pairs(backend, gens({"p0": "x", "p1": "y"}), gens({"p0": "z", "p1": "w"}), "a", "b")
    s = summarize(table)
    assert s["errors"] == 2 and s["ties"] == 0 and np.isnan(s["win_rate"])
    assert all("HTTP 503" in e for e in table.column("error").to_pylist())
    assert server.auth == {""}  # no key configured -> no Authorization header




class ScriptedChat:
    """A chat-completions endpoint on 127.0.0.1 whose answer is `decide(prompt, text_1, text_2)` ("1" or "2")."""

    def __init__(self, decide):
        def answer(content: str) -> str:
            prompt = content.split("Prompt:")[1].split("Text 1:")[0].strip()
            t1 = content.split("Text 1:")[1].split("Text 2:")[0].strip()
            t2 = content.split("Text 2:")[1].split("Which text")[0].strip()
            return decide(prompt, t1, t2)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                data = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": answer(body["messages"][0]["content"])}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_judge_sanity_passes_a_judge_that_knows_better_and_fails_one_that_picks_slot_1(store_root, monkeypatch):
    from sftcurate.core.judge import TRUSTED_ACCURACY, judge_sanity

    ids = [f"p{i}" for i in range(9)]
    references = {f"Explain Python lists {i}": f"the true continuation of prompt {i} says lists keep order and "
                  f"grow as needed, case {i}" for i in ids}
    table = pa.table({"prompt_id": ids, "prompt": [f"Explain Python lists {i}" for i in ids],
                      "reference": [references[f"Explain Python lists {i}"] for i in ids],
                      "text": ["a model's text"] * len(ids)})
    gens_uri = commit_gens("sanity", table)
    knows = ScriptedChat(lambda prompt, t1, t2: "1" if t1 == references[prompt] else "2")
    slot_1 = ScriptedChat(lambda prompt, t1, t2: "1")
    results = {}
    for name, server in (("knows", knows), ("slot_1", slot_1)):
        with server:
            monkeypatch.setenv("SFTCURATE_JUDGE_BASE_URL", server.url)
            cfg = JudgeConfig(backend="openai", model=f"scripted-{name}", timeout_s=5, max_retries=0, logprobs=False)
            results[name] = read_manifest(judge_sanity(gens_uri, cfg, seed=0))["meta"]
    assert results["knows"]["accuracy"] == 1.0 and results["knows"]["trusted"]
    assert results["knows"]["position_bias"] == 0.5 and results["knows"]["pairs"] == 9
    assert results["slot_1"]["accuracy"] == 0.0 < TRUSTED_ACCURACY and not results["slot_1"]["trusted"]
    assert results["slot_1"]["position_bias"] == 1.0
