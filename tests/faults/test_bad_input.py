"""Issue 11, fault 6: a catalogue of bad input, each refused with one line naming the file, row or field.

Every case runs the CLI (in-process through typer's runner, against the session's Prefect test server) on a
store that already holds a good run's artifacts, and checks: exit status 2, exactly one `error:` line that names
what is wrong, no traceback, and no new `_MANIFEST.json` in the store (nothing committed). A few cases run again
as real processes, where Prefect's own log handlers would show a traceback if one were printed.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from tests.conftest import committed_manifests
from tests.faults.full import when_full
from tests.helpers import invoke, qa_records, write_jsonl

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_harness")]

GOOD_CONFIG = """name: bad-input
source:
  uri: {data}
  heldout_fraction: 0.1
selection: {{method: uniform, budget: 4}}
models: {{target: tiny-gpt2, max_length: 64}}
"""
COMPARE_CONFIG = """name: bad-compare
source: {{uri: {data}}}
models: {{target: tiny-gpt2, max_length: 64}}
methods: [uniform]
budgets: [4]
budget_unit: examples
"""


@dataclass
class World:
    dir: Path
    store: str
    data: Path          # a good jsonl pool
    config: Path        # a good config on it
    selection_uri: str  # a committed selection of a good run
    examples_uri: str
    compare_config: Path  # a good comparison config on the same pool

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def config_on(self, name: str, source: Path | str, extra: str = "") -> Path:
        return self.file(name, GOOD_CONFIG.format(data=source) + extra)

    def parquet(self, name: str, table: pa.Table) -> Path:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.file(name, buf.getvalue())

    def tensors(self, name: str, tensors: dict[str, np.ndarray]) -> Path:
        path = self.dir / name
        save_file(tensors, str(path))
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, prefect_harness) -> World:
    tmp = tmp_path_factory.mktemp("bad-input")
    store = str(tmp / "artifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTCURATE_STORE", store)
        data = write_jsonl(tmp / "pool.jsonl", qa_records(30))
        config = tmp / "good.yaml"
        config.write_text(GOOD_CONFIG.format(data=data))
        summary = tmp / "summary.json"
        result = invoke("run", config, "--json", summary)
        assert result.exit_code == 0, result.output[-3000:]
        s = json.loads(summary.read_text())
        compare_config = tmp / "compare.yaml"
        compare_config.write_text(COMPARE_CONFIG.format(data=data))
        yield World(tmp, store, data, config, s["selection_uri"], s["examples_uri"], compare_config)


def chat(messages: list[dict]) -> str:
    return json.dumps({"messages": messages}) + "\n"


def good_lines(n: int = 3) -> str:
    return "".join(json.dumps(r) + "\n" for r in qa_records(n))


def features_file(w: World, name: str, **tensors) -> Path:
    base = {"features": np.ones((6, 4), np.float32), "offsets": np.array([0, 2, 4, 6], np.int64)}
    base.update(tensors)
    return w.tensors(name, {k: v for k, v in base.items() if v is not None})


# Each case: (id, a function World -> (CLI arguments, text the one error line must contain)).
CASES = [
    # ---- config files
    ("config-not-found", lambda w: (["run", w.dir / "nope.yaml"], "nope.yaml: config file not found")),
    ("config-yaml-syntax", lambda w: (["run", w.file("syntax.yaml", "name: x\nsource: {uri: [unclosed\n")],
                                      "syntax.yaml: not valid YAML")),
    ("config-not-a-mapping", lambda w: (["run", w.file("list.yaml", "- a\n- b\n")],
                                        "list.yaml: top level must be a mapping")),
    ("config-not-utf8", lambda w: (["run", w.file("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))],
                                   "latin1.yaml: not valid YAML")),
    ("config-unknown-section", lambda w: (["run", w.config_on("section.yaml", w.data, "selektion: {budget: 3}\n")],
                                          "field 'selektion' is unknown")),
    ("config-unknown-key", lambda w: (["run", w.config_on("key.yaml", w.data, "proxy: {stepz: 3}\n")],
                                      "field 'proxy.stepz' is unknown; valid keys there: steps")),
    ("config-wrong-type", lambda w: (["run", w.config_on("type.yaml", w.data, "embedding: {shard_size: many}\n")],
                                     "field 'embedding.shard_size'")),
    ("config-bad-literal", lambda w: (["run", w.config_on("fmt.yaml", w.data, "embedding: {dtype: float8}\n")],
                                      "field 'embedding.dtype'")),
    # ---- --set values
    ("set-no-equals", lambda w: (["run", w.config, "--set", "selection.budget"], "--set selection.budget: expected key=value")),
    ("set-not-a-section", lambda w: (["run", w.config, "--set", "selection.budget.x=1"], "'budget' is not a section")),
    ("set-unknown-method", lambda w: (["run", w.config, "--set", "selection.method=nope"], "selector 'nope' is unknown")),
    ("set-unknown-param", lambda w: (["run", w.config, "--set", "selection.method=fishersft",
                                      "--set", "selection.params.lamda=5"],
                                     "field 'selection.params.fishersft.lamda' is unknown")),
    ("set-wrong-type", lambda w: (["run", w.config, "--set", "selection.budget=lots"], "field 'selection.budget'")),
    ("budget-zero", lambda w: (["run", w.config, "--set", "selection.budget=0"], "budget must be > 0")),
    ("budget-bool", lambda w: (["run", w.config, "--set", "selection.budget=true"],
                               "field 'selection.budget': expected a whole number, got bool True")),
    ("budget-float", lambda w: (["run", w.config, "--set", "selection.budget=2.0"],
                                "field 'selection.budget': expected a whole number, got float 2.0")),
    ("selector-count-bool", lambda w: (["run", w.config, "--set", "selection.method=s2l", "--set",
                                        "selection.params.clusters=true"],
                                       "field 'selection.params.s2l': 'clusters' expected a whole number, got bool")),
    ("compare-budgets-bool", lambda w: (["compare", w.compare_config, "--set", "budgets=[8, false]"],
                                        "field 'budgets': expected a whole number, got bool False")),
    ("budget-larger-than-pool", lambda w: (["run", w.config, "--set", "selection.budget=500"],
                                           "larger than the pool")),
    ("token-budget-larger-than-pool", lambda w: (["run", w.config, "--set", "selection.budget=null",
                                                  "--set", "selection.token_budget=10000000"],
                                                 "token_budget: 10000000 tokens is larger than the pool")),
    ("limit-zero", lambda w: (["run", w.config, "--set", "source.limit=0"], "field 'source.limit'")),
    ("sample-negative", lambda w: (["run", w.config, "--set", "source.sample=-3"], "field 'source.sample'")),
    ("heldout-fraction-one", lambda w: (["run", w.config, "--set", "source.heldout_fraction=1"],
                                        "field 'source.heldout_fraction'")),
    ("max-length-too-small", lambda w: (["run", w.config, "--set", "models.max_length=4"], "field 'models.max_length'")),
    # ---- source files of every format
    ("source-missing", lambda w: (["run", w.config_on("missing.yaml", w.dir / "absent.jsonl")],
                                  "absent.jsonl: file not found")),
    ("source-glob-matches-nothing", lambda w: (["run", w.config_on("glob.yaml", w.dir / "nothing-*.jsonl")],
                                               "no file matches this pattern")),
    ("source-empty-file", lambda w: (["run", w.config_on("empty.yaml", w.file("empty.jsonl", ""))],
                                     "the data set is empty")),
    ("jsonl-malformed-row", lambda w: (["run", w.config_on("jsonl.yaml", w.file(
        "broken.jsonl", good_lines(2) + '{"prompt": "p", "response": \n'))], "broken.jsonl: line 3: not valid JSON")),
    ("jsonl-row-not-object", lambda w: (["run", w.config_on("arr.yaml", w.file(
        "arrays.jsonl", good_lines(2) + '["p", "r"]\n'))], "arrays.jsonl: line 3: record must be an object")),
    ("jsonl-wrong-field-type", lambda w: (["run", w.config_on("ftype.yaml", w.file(
        "ftype.jsonl", good_lines(2) + '{"prompt": "p", "response": 3}\n'))],
        "ftype.jsonl: line 3: field 'response' must be a string, got int")),
    ("jsonl-not-utf8", lambda w: (["run", w.config_on("enc.yaml", w.file(
        "latin1.jsonl", good_lines(1).encode() + '{"prompt": "caf\xe9", "response": "r"}\n'.encode("latin-1")))],
        "latin1.jsonl: line 2: bytes are not valid UTF-8")),
    ("jsonl-empty-response", lambda w: (["run", w.config_on("emptyresp.yaml", w.file(
        "emptyresp.jsonl", good_lines(2) + '{"prompt": "p", "response": "  "}\n'))],
        "emptyresp.jsonl: line 3: the response/text field is empty")),
    ("json-not-a-list", lambda w: (["run", w.config_on("json.yaml", w.file("obj.json", '{"a": 1}'))],
                                   "obj.json: expected a JSON list of records")),
    ("csv-wrong-columns", lambda w: (["run", w.config_on("csv.yaml", w.file(
        "cols.csv", "question,answer\nq1,a1\nq2,a2\n"))], "cols.csv: row 1: unknown format (columns ['answer', 'question'])")),
    ("csv-ragged-row", lambda w: (["run", w.config_on("ragged.yaml", w.file(
        "ragged.csv", "prompt,response\nq1,a first answer\nq2,an answer, with an unquoted comma\n"))],
        "ragged.csv: row 2 (line 3): 3 fields, the header has 2")),
    ("jsonl-lone-surrogate", lambda w: (["run", w.config_on("surrogate.yaml", w.file(
        "surrogate.jsonl", good_lines(2) + '{"prompt": "p", "response": "half an emoji \\ud83d"}\n'))],
        "surrogate.jsonl: line 3: field 'response' holds a lone surrogate \\ud83d")),
    ("gzip-not-gzip", lambda w: (["run", w.config_on("gz.yaml", w.file("fake.jsonl.gz", good_lines(2)))],
                                 "fake.jsonl.gz: not a readable gzip file")),
    ("parquet-wrong-columns", lambda w: (["run", w.config_on("pq.yaml", w.parquet(
        "cols.parquet", pa.table({"question": ["q"], "answer": ["a"]})))], "cols.parquet: row 1: unknown format")),
    ("parquet-corrupt", lambda w: (["run", w.config_on("pqc.yaml", w.file("corrupt.parquet", b"PAR1 not really"))],
                                   "corrupt.parquet: not a readable parquet file")),
    ("unknown-file-type", lambda w: (["run", w.config_on("xml.yaml", w.file("data.xml", "<a/>"))],
                                     "data.xml: unknown file type '.xml'")),
    ("txt-no-passages", lambda w: (["run", w.config_on("txt.yaml", w.file("short.txt", "too short\n"))],
                                   "the data set is empty")),
    ("chat-no-assistant-turn", lambda w: (["run", w.config_on("chat.yaml", w.file(
        "chat.jsonl", chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
        + chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])))],
        "chat.jsonl: line 2: field 'messages' has no assistant turn")),
    ("chat-unknown-role", lambda w: (["run", w.config_on("role.yaml", w.file(
        "role.jsonl", chat([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}])))],
        "role.jsonl: line 1: field 'messages[0].role' has unknown role 'wizard'")),
    ("sharegpt-turn-without-value", lambda w: (["run", w.config_on("sg.yaml", w.file(
        "sg.jsonl", json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}) + "\n"))],
        "sg.jsonl: line 1: field 'conversations[1]' must have 'from' and 'value'")),
    ("columns-map-to-missing", lambda w: (["run", w.config, "--set", "source.format=prompt_response", "--set",
                                           "source.columns={prompt: question}"], "line 1: field 'question' is missing")),
    ("group-field-missing", lambda w: (["run", w.config, "--set", "source.group_field=category"],
                                       "line 1: field 'category' (source.group_field) is missing")),
    ("unknown-builtin", lambda w: (["run", w.config, "--set", "source.uri=builtin:wikipedia"],
                                   "unknown built-in data set")),
    # ---- model specs
    ("model-folder-missing", lambda w: (["run", w.config, "--set", f"models.target={w.dir}/no-model"],
                                        "no-model': folder not found")),
    ("model-pickled-weights", lambda w: (["run", w.config, "--set", f"models.target={pickled_model(w)}"],
                                         "its weights are a pickle (pytorch_model.bin)")),
    ("model-empty-folder", lambda w: (["run", w.config, "--set", f"models.target={empty_folder(w)}"],
                                      "the folder is empty")),
    ("model-tiny-option", lambda w: (["run", w.config, "--set", "models.target=tiny-gpt2:wings=3"],
                                     "unknown option 'wings'")),
    # ---- features and trajectories files (sftcurate select)
    ("features-not-safetensors", lambda w: (["select", "fishersft", "--features", w.file("f.safetensors", b"garbage"),
                                             "--budget", "2", "--out", w.dir / "o.parquet"],
                                            "f.safetensors: not a readable safetensors file")),
    ("features-wrong-shape", lambda w: (["select", "fishersft", "--features", features_file(
        w, "shape.safetensors", features=np.ones(6, np.float32)), "--budget", "2", "--out", w.dir / "o.parquet"],
        "shape.safetensors: tensor 'features' has shape (6,), expected 2 dimensions")),
    ("features-wrong-dtype", lambda w: (["select", "fishersft", "--features", features_file(
        w, "dtype.safetensors", offsets=np.array([0, 2, 4, 6], np.int32)), "--budget", "2", "--out", w.dir / "o.parquet"],
        "dtype.safetensors: tensor 'offsets' has dtype int32, expected int64")),
    ("features-missing-offsets", lambda w: (["select", "fishersft", "--features", features_file(
        w, "nooff.safetensors", offsets=None), "--budget", "2", "--out", w.dir / "o.parquet"],
        "nooff.safetensors: missing tensor 'offsets'")),
    ("features-offsets-not-monotone", lambda w: (["select", "fishersft", "--features", features_file(
        w, "mono.safetensors", offsets=np.array([0, 4, 2, 6], np.int64)), "--budget", "2", "--out", w.dir / "o.parquet"],
        "mono.safetensors: 'offsets' not monotone at sentence 1")),
    ("features-nan", lambda w: (["select", "fishersft", "--features", features_file(
        w, "nan.safetensors", features=np.array([[1.0] * 4] * 3 + [[np.nan] * 4] + [[1.0] * 4] * 2, np.float32)),
        "--budget", "2", "--out", w.dir / "o.parquet"], "nan.safetensors: 'features' row 3 (sentence 1) has NaN")),
    ("features-file-missing", lambda w: (["select", "fishersft", "--features", w.dir / "gone.safetensors",
                                          "--budget", "2", "--out", w.dir / "o.parquet"],
                                         "gone.safetensors: file not found")),
    ("select-budget-larger-than-pool", lambda w: (["select", "fishersft", "--features", features_file(
        w, "ok.safetensors"), "--budget", "9", "--out", w.dir / "o.parquet"], "larger than the pool (3 train")),
    ("select-unknown-param", lambda w: (["select", "fishersft", "--features", features_file(w, "ok2.safetensors"),
                                         "--budget", "2", "--param", "lamda=3", "--out", w.dir / "o.parquet"],
                                        "'fishersft' has no parameter 'lamda'")),
    ("trajectories-wrong-ndim", lambda w: (["select", "s2l", "--trajectories", w.file(
        "traj.npy", _npy(np.ones(5, np.float32))), "--budget", "2", "--out", w.dir / "o.parquet"],
        "traj.npy: expected a 2-d [examples, checkpoints] array")),
    ("trajectories-missing-steps", lambda w: (["select", "s2l", "--trajectories", w.tensors(
        "nosteps.safetensors", {"losses": np.ones((4, 3), np.float32)}), "--budget", "2", "--out", w.dir / "o.parquet"],
        "nosteps.safetensors: missing tensor 'steps'")),
    ("trajectories-steps-mismatch", lambda w: (["select", "s2l", "--trajectories", w.tensors(
        "mismatch.safetensors", {"losses": np.ones((4, 3), np.float32), "steps": np.arange(2, dtype=np.int64)}),
        "--budget", "2", "--out", w.dir / "o.parquet"], "'losses' has 3 checkpoints but 'steps' has 2")),
    # ---- selection files (sftcurate export)
    ("export-not-committed", lambda w: (["export", f"{w.store}/selection/no-such-key", "--out", w.dir / "x.jsonl"],
                                        "no-such-key: no committed selection or curated artifact there")),
    ("export-not-a-selection", lambda w: (["export", w.examples_uri, "--out", w.dir / "x.jsonl"],
                                          "a 'examples' artifact, not a selection")),
    ("export-over-an-existing-file", lambda w: (["export", w.selection_uri, "--out", w.file(
        "existing.jsonl", "an earlier export\n")], "existing.jsonl: already exists; pass --overwrite")),
    ("export-over-its-own-source", lambda w: (["export", w.selection_uri, "--out", w.data, "--overwrite"],
                                              "a file the selection was curated from")),
    ("export-out-is-a-folder", lambda w: (["export", w.selection_uri, "--out", w.dir, "--overwrite"],
                                          "is a folder; give a file path")),
    ("export-bad-format", lambda w: (["export", w.selection_uri, "--out", w.dir / "x.jsonl", "--format", "xml"],
                                     "--format xml: use jsonl, parquet, messages or hf")),
    # ---- judge settings (sftcurate compare)
    ("judge-unknown-backend", lambda w: (["compare", w.compare_config, "--set", "judge.backend=gpt"], "field 'judge.backend'")),
    ("judge-template-without-slots", lambda w: (["compare", w.compare_config, "--set", "judge.template=rate {text_1}"],
                                                "judge template must contain {text_2}")),
    ("judge-template-stray-brace", lambda w: (["compare", w.compare_config, "--set",
                                               "judge.template='{text_1} {text_2} {oops}'"],
                                              "judge template has an unknown placeholder")),
    ("judge-zero-prompts", lambda w: (["compare", w.compare_config, "--set", "judge.max_prompts=0"],
                                      "field 'judge.max_prompts'")),
    ("compare-budgets-repeat", lambda w: (["compare", w.compare_config, "--set", "budgets=[8, 8]"], "budgets must not repeat")),
    ("compare-unknown-method", lambda w: (["compare", w.compare_config, "--set", "methods=[fishersft, magic]"],
                                          "selector 'magic' is unknown")),
]


def pickled_model(w: World) -> Path:
    """A model folder whose weights are a pickle (pytorch_model.bin): never unpickled."""
    import torch

    folder = w.dir / "pickled-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    torch.save({"transformer.wte.weight": torch.zeros(4, 8)}, folder / "pytorch_model.bin")
    return folder


def empty_folder(w: World) -> Path:
    (w.dir / "empty-model").mkdir(exist_ok=True)
    return w.dir / "empty-model"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# Known to break the one-line rule, each with the reason; strict, so a fix shows up as a failure to remove it here.
KNOWN_BROKEN: dict[str, str] = {}


@pytest.mark.parametrize("name,case", [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[c[0]])) if c[0] in KNOWN_BROKEN else c
    for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_commits_nothing(world, name, case, monkeypatch):
    monkeypatch.setenv("SFTCURATE_STORE", world.store)
    args, expected = case(world)
    before = committed_manifests(world.store)
    out_before = set(os.listdir(world.dir))
    result = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    errors = error_lines(result.output)
    assert len(errors) == 1, result.output[-3000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert committed_manifests(world.store) == before, "a bad input committed an artifact"
    written = set(os.listdir(world.dir)) - out_before
    assert not written & {"o.parquet", "x.jsonl"}, f"an output was written: {written}"


def test_the_catalogue_covers_at_least_25_kinds():
    assert len({name for name, _ in CASES}) == len(CASES) >= 25


# In a real process Prefect's log handlers write to the terminal: a logged traceback would show there.
PROCESS_CASES = when_full(["jsonl-malformed-row", "csv-ragged-row", "model-pickled-weights"],
                          ["jsonl-malformed-row", "csv-ragged-row", "model-pickled-weights", "budget-larger-than-pool",
                                                   "features-wrong-shape", "export-not-a-selection",
                                                   "model-folder-missing", "judge-template-without-slots"])


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_input_in_a_real_process_prints_one_line(world, name):
    from prefect.settings import PREFECT_API_URL

    args, expected = dict(CASES)[name](world)
    before = committed_manifests(world.store)
    env = {**os.environ, "SFTCURATE_STORE": world.store, "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=world.dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "╭" not in proc.stderr, proc.stderr[-3000:]
    assert committed_manifests(world.store) == before


def test_an_unreachable_hub_is_one_line_exit_1_in_a_real_process(world):
    """A hub model id with the hub out of reach (HF_HUB_OFFLINE, nothing cached): the environment, not the input."""
    from prefect.settings import PREFECT_API_URL

    before = committed_manifests(world.store)
    env = {**os.environ, "SFTCURATE_STORE": world.store, "PREFECT_API_URL": PREFECT_API_URL.value() or "",
           "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_HOME": str(world.dir / "empty-hf-home")}
    proc = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(world.config),
                           "--set", "models.target=sftcurate-tests/no-such-model"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=world.dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "model 'sftcurate-tests/no-such-model': the Hugging Face hub could not be reached" \
        in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert committed_manifests(world.store) == before
