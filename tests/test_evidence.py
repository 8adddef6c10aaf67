"""The comparison's statistics on synthetic per-example losses whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest

from sftcurate.core import evidence


def synthetic(n_rep: int, shift: float = 0.0, n: int = 200, rep_noise: float = 0.05, seed: int = 0):
    """loss[r, i] = tokens[i] * (2 + shift + replicate offset + example noise)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 40, size=n).astype(np.float64)
    per_token = 2.0 + shift + rng.normal(0, rep_noise, size=(n_rep, 1)) + rng.normal(0, 0.3, size=(n_rep, n))
    return per_token * tokens, tokens


def test_token_weighted_mean_and_interval_cover_the_truth():
    loss, tokens = synthetic(4)
    ci = evidence.bootstrap(loss, tokens, n_boot=500)
    assert ci.low < ci.mean < ci.high
    assert ci.low < 2.0 < ci.high
    assert ci.mean == pytest.approx(np.mean(loss.sum(1) / tokens.sum()))


def test_interval_narrows_with_more_replicates():
    widths = {}
    for reps in (2, 8):
        w = [evidence.bootstrap(*synthetic(reps, rep_noise=0.2, seed=s), n_boot=400, seed=s).width for s in range(6)]
        widths[reps] = float(np.mean(w))
    assert widths[8] < widths[2]


def test_paired_difference_calls_only_what_its_interval_supports():
    base, tokens = synthetic(3, seed=1)
    rng = np.random.default_rng(7)
    better = base - 0.2 * tokens + rng.normal(0, 0.05, size=base.shape) * tokens   # clearly lower loss
    same = base + rng.normal(0, 0.05, size=base.shape) * tokens                    # noise only
    d_better = evidence.paired_difference(better, base, tokens, n_boot=500)
    d_same = evidence.paired_difference(same, base, tokens, n_boot=500)
    assert evidence.verdict(d_better) == "better" and d_better.high < 0
    assert evidence.verdict(d_same) == "no difference" and d_same.low < 0 < d_same.high
    assert evidence.verdict(evidence.paired_difference(base, better, tokens, n_boot=500)) == "worse"
    assert evidence.verdict(d_better, replicates=1) == "not called (1 replicate)"


def test_group_losses_worst_group_and_coverage_of_a_rare_group():
    tokens = np.full(6, 10.0)
    loss = np.array([[10, 10, 10, 10, 40, 40]], dtype=np.float64)  # group "rare" has loss 4 per token
    groups = ["common"] * 4 + ["rare"] * 2
    per_group = evidence.group_losses(loss, tokens, groups)
    assert per_group == {"common": pytest.approx(1.0), "rare": pytest.approx(4.0)}
    assert evidence.worst_group(per_group) == ("rare", pytest.approx(4.0))
    pool = ["common"] * 95 + ["rare"] * 5
    missing = evidence.coverage(["common"] * 10, pool)
    covered = evidence.coverage(["common"] * 9 + ["rare"], pool)
    assert missing["groups_covered"] == 1 and covered["groups_covered"] == 2 and missing["groups"] == 2
    assert covered["share_distance"] < missing["share_distance"]
    assert covered["picks_per_group"] == {"common": 9, "rare": 1}


def test_worst_group_difference_sees_a_gain_the_mean_hides():
    base, tokens = synthetic(3, n=300, seed=2)
    groups = ["rare" if i % 10 == 0 else "common" for i in range(300)]
    rare = np.array([g == "rare" for g in groups])
    base[:, rare] += 1.0 * tokens[rare]                                      # uniform's worst group
    rng = np.random.default_rng(3)
    method = base + rng.normal(0, 0.02, size=base.shape) * tokens
    method[:, rare] -= 0.4 * tokens[rare]                                     # better on the rare group only
    method[:, ~rare] += 0.045 * tokens[~rare]                                 # slightly worse elsewhere
    worst, _ = evidence.worst_group(evidence.group_losses(base, tokens, groups))
    assert worst == "rare"
    on_worst = evidence.group_difference(method, base, tokens, groups, worst, n_boot=500)
    assert evidence.verdict(on_worst) == "better" and on_worst.mean == pytest.approx(-0.4, abs=0.05)
    overall = evidence.paired_difference(method, base, tokens, n_boot=500)
    assert overall.mean > on_worst.mean
    assert evidence.group_difference(method, base, tokens, groups, "absent") is None
    tiny = ["tiny"] * 3 + ["common"] * 297  # three examples: no interval worth calling
    assert evidence.group_difference(method, base, tokens, tiny, "tiny") is None
    # a tiny group that is uniform's worst is passed over for the worst group that can be tested
    base[:, :3] += 5.0 * tokens[:3]
    per_group = evidence.group_losses(base, tokens, tiny)
    assert evidence.worst_group(per_group)[0] == "tiny"
    assert evidence.testable_groups(tiny) == {"common"}
    assert evidence.worst_group(per_group, among=evidence.testable_groups(tiny))[0] == "common"
    assert evidence.worst_group(per_group, among=set()) == (None, None)


def test_report_plot_keeps_each_methods_colour_in_both_panels_and_separates_their_intervals():
    """The difference panel has no uniform line; a method must still have the colour it has in the loss panel,
    and intervals at one budget must not sit on top of each other."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from sftcurate.core.report import plot_figure

    methods = ["uniform", "fishersft", "s2l", "full"]
    rows = [{"method": "base", "budget": 0, "heldout_loss": 3.0}]
    for i, m in enumerate(methods):
        for b in (3000, 6000):
            loss = 2.9 - 0.01 * i
            rows.append({"method": m, "budget": b, "heldout_loss": loss, "loss_ci_low": loss - 0.4,
                         "loss_ci_high": loss + 0.4, "delta_vs_uniform": None if m == "uniform" else -0.01 * i,
                         "delta_ci_low": None if m == "uniform" else -0.01 * i - 0.03,
                         "delta_ci_high": None if m == "uniform" else -0.01 * i + 0.03})
    fig = plot_figure(SimpleNamespace(budget_unit="tokens", budgets=[3000, 6000]), rows, methods)
    loss_ax, diff_ax = fig.axes
    colour = {c.get_label(): c.lines[0].get_color() for c in loss_ax.containers}
    assert len(set(colour.values())) == len(methods)
    for c in diff_ax.containers:
        assert c.lines[0].get_color() == colour[c.get_label()], c.get_label()
    assert {c.get_label() for c in diff_ax.containers} == set(methods) - {"uniform"}
    xs = [float(c.lines[0].get_xdata()[0]) for c in loss_ax.containers]
    assert len(set(xs)) == len(methods) and max(xs) - min(xs) < 300
    plt.close(fig)


def test_redundant_pool_keeps_the_heldout_split_and_copies_only_the_largest_training_group(monkeypatch):
    """The evidence's redundant pools (benchmarks/bench_evidence.py): held-out records are the corpus's own, and
    every near-copy is of a training record of the largest training group, lands in the training split itself,
    and keeps its record's answer."""
    from collections import Counter
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_evidence import COPIES, HOWTO_COPY_TEMPLATES, redundant_records

    from sftcurate.core.ingest import example_id, is_heldout

    records = [{"instruction": f"guide {g}: section {i}", "input": "", "output": f"text {g} {i} " * 20,
                "group": f"g{g}"} for g, size in enumerate((40, 15, 5)) for i in range(size)]
    pool = redundant_records(records, HOWTO_COPY_TEMPLATES)

    def held(rs):
        return is_heldout([example_id(r["instruction"], r["output"]) for r in rs], 0.15)

    assert pool[:len(records)] == records
    copies = pool[len(records):]
    assert not any(held(copies))
    train = [r for r, h in zip(records, held(records)) if not h]
    assert {r["group"] for r in copies} == {"g0"} == {Counter(r["group"] for r in train).most_common(1)[0][0]}
    originals = {r["output"]: r for r in train if r["group"] == "g0"}
    per_original = Counter(r["output"] for r in copies)
    assert set(per_original) <= set(originals) and max(per_original.values()) <= COPIES
    assert sum(per_original.values()) >= 2 * len(originals)           # most templates survive the split
    assert all(r["instruction"] != originals[r["output"]]["instruction"] for r in copies)
