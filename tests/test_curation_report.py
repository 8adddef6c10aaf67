"""The curation report: the knee of the gain curve, a sample of the picks, lengths and group coverage from the
artifacts (no hand-written figure)."""
from __future__ import annotations

import numpy as np

from sftcurate.core.config import CurateConfig
from sftcurate.core.curation_report import curation_report, knee, report_data
from sftcurate.core.ingest import load_pool
from sftcurate.core.selection import load_selection
from sftcurate.flows.curate import select_pipeline
from tests.helpers import write_jsonl


def test_knee_is_where_a_decreasing_curve_bends():
    gains = np.concatenate([np.linspace(100, 10, 10), np.linspace(9.9, 9, 90)])  # bends after pick 10
    assert knee(gains) in (9, 10)
    assert knee(np.ones(20)) is None and knee(np.array([3.0, 2.0])) is None


def records() -> list[dict]:
    rare = [{"prompt": f"rare question {i}", "response": "short", "category": "rare"} for i in range(3)]
    common = [{"prompt": f"question {i}", "response": " ".join(["word"] * (5 + i % 20)), "category": "common"}
              for i in range(60)]
    return rare + common


def test_report_comes_from_the_selection_and_the_pool(tmp_path, store_root):
    data = write_jsonl(tmp_path / "pool.jsonl", records())
    cfg = CurateConfig.model_validate({
        "name": "report-test", "source": {"uri": str(data), "heldout_fraction": 0.0, "group_field": "category"},
        "selection": {"method": "fishersft", "budget": 12, "seed": 0},
        "models": {"target": "tiny-gpt2", "max_length": 64}})
    examples_uri, selection_uri = select_pipeline(cfg, None)
    info = report_data(examples_uri, selection_uri)
    table, _ = load_selection(selection_uri)
    pool = load_pool(examples_uri)
    first = int(np.asarray(table.column("index"))[np.argmin(np.asarray(table.column("rank")))])
    assert info["sample"][0]["id"] == pool.column("id")[first].as_py()
    assert sorted(info["pick_tokens"]) == sorted(table.column("tokens").to_pylist())
    assert dict((g, n) for g, n, _ in info["groups"]) == {"rare": 3, "common": 60}
    assert sum(p for _, _, p in info["groups"]) == 12
    gains = info["gains"]
    assert gains is not None and len(gains) == 12 and (np.diff(gains) <= 1e-9).all()  # submodular: gains fall
    markdown, png = curation_report(examples_uri, selection_uri, "report-test")
    assert "## A sample of the picks" in markdown and "## Groups:" in markdown and "Marginal gain" in markdown
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
