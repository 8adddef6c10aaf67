"""What a curation picked, for people: a sample of the picks, the marginal gain by pick rank with its knee as a
budget hint (FisherSFT), clusters and picks per cluster (S2L), the picks' lengths against the pool's, and group
coverage. Markdown for the Prefect UI and MLflow, a PNG for MLflow."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from sftcurate.core.ingest import load_pool
from sftcurate.core.selection import load_selection
from sftcurate.data_contracts.manifests import ExamplesMeta
from sftcurate.infra.stages import read_meta

SAMPLE_PICKS = 5
SNIPPET_CHARS = 90


def knee(values: np.ndarray) -> int | None:
    """Index of the point farthest below the chord from the first to the last value of a decreasing curve
    (Kneedle's idea): where extra picks start to add little. None for fewer than 3 points or a flat curve."""
    y = np.asarray(values, dtype=np.float64)
    if len(y) < 3 or not np.isfinite(y).all() or y[0] <= y[-1]:
        return None
    x = np.linspace(0.0, 1.0, len(y))
    y = (y - y[-1]) / (y[0] - y[-1])
    chord = 1.0 - x
    return int(np.argmax(chord - y))


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def report_data(examples_uri: str, selection_uri: str) -> dict:
    pool = load_pool(examples_uri)
    table, meta = load_selection(selection_uri)
    order = np.argsort(np.asarray(table.column("rank")))
    picks = table.take(pa.array(order))
    index = np.asarray(picks.column("index"))
    groups = np.asarray(pool.column("group").to_pylist(), dtype=object)
    pool_groups, pool_counts = np.unique(groups, return_counts=True)
    picked_groups = dict(zip(*np.unique(groups[index], return_counts=True))) if len(index) else {}
    gains = np.asarray([g if g is not None else np.nan for g in picks.column("gain").to_pylist()], dtype=np.float64)
    info = meta.info
    data = {
        "method": meta.method, "selected": len(index), "pool_size": pool.num_rows,
        "pick_tokens": np.asarray(picks.column("tokens"), dtype=np.int64),
        "pool_tokens": np.asarray(pool.column("response_tokens"), dtype=np.int64),
        "sample": [{"rank": r, "id": pool.column("id")[int(i)].as_py(), "group": groups[int(i)],
                    "tokens": int(picks.column("tokens")[r].as_py()),
                    "prompt": snippet(pool.column("prompt")[int(i)].as_py()),
                    "response": snippet(pool.column("response")[int(i)].as_py())}
                   for r, i in enumerate(index[:SAMPLE_PICKS])],
        "groups": [(g, int(n), int(picked_groups.get(g, 0))) for g, n in zip(pool_groups, pool_counts)],
        "gains": gains if np.isfinite(gains).any() else None,
        "cluster_sizes": info.get("cluster_sizes"), "picks_per_cluster": info.get("picks_per_cluster"),
        "text": text_summary(read_meta(examples_uri, ExamplesMeta)),
    }
    data["knee"] = knee(data["gains"]) if data["gains"] is not None else None
    return data


def text_summary(meta: ExamplesMeta) -> dict:
    """The template the examples were tokenized with and what `source.too_long` did."""
    return {"template": meta.template, "max_length": meta.max_length, "too_long": meta.too_long,
            "dropped": meta.too_long_dropped, "cut": meta.too_long_cut, "whole": meta.too_long_whole}


def text_lines(text: dict) -> list[str]:
    over = text["dropped"] + text["cut"] + text["whole"]
    lines = ["", "## The text every stage saw", "",
             f"Template `{text['template']}`, at most {text['max_length']} tokens per example (models.max_length). "
             f"{over} records were longer: {text['cut']} cut, {text['dropped']} dropped, {text['whole']} kept whole "
             f"(source.too_long: {text['too_long']})."]
    if text["cut"]:
        lines.append("Cut records were selected, counted and trained on as cut, and the export writes them cut.")
    if text["whole"]:
        lines.append("Records kept whole count every token in budgets, but token features and the built-in "
                     "fine-tune saw only their first max_length tokens.")
    return lines


def report_markdown(data: dict, name: str) -> str:
    lines = [f"# What `{name}` picked ({data['method']}): {data['selected']} of {data['pool_size']} examples", ""]
    lines += ["## A sample of the picks", "", "| rank | group | loss tokens | prompt | response |", "|---|---|---|---|---|"]
    lines += [f"| {s['rank']} | {s['group']} | {s['tokens']} | {s['prompt']} | {s['response']} |" for s in data["sample"]]
    if data["gains"] is not None:
        lines += ["", "## Marginal gain by pick rank", ""]
        k = data["knee"]
        g = data["gains"]
        lines.append(f"First pick {g[0]:.4g}, median {np.nanmedian(g):.4g}, last {g[-1]:.4g}.")
        if k is not None:
            tokens = int(data["pick_tokens"][: k + 1].sum())
            lines.append(f"**Budget hint:** the gain curve bends at pick {k + 1} ({tokens} loss tokens); picks "
                         f"after it add less information each.")
    if data["cluster_sizes"]:
        sizes, picks = data["cluster_sizes"], data["picks_per_cluster"] or []
        covered = sum(1 for p in picks if p)
        lines += ["", "## Clusters (S2L)", "", f"{covered} of {len(sizes)} clusters have picks; smallest clusters "
                  f"first: " + ", ".join(f"{s}→{p}" for s, p in sorted(zip(sizes, picks))[:12]) + " (size→picks)."]
    lines += text_lines(data["text"])
    pick_len, pool_len = data["pick_tokens"], data["pool_tokens"]
    lines += ["", "## Lengths (loss tokens)", "", "| | examples | mean | median | p90 |", "|---|---|---|---|---|"]
    for label, v in (("picks", pick_len), ("pool", pool_len)):
        if len(v):
            lines.append(f"| {label} | {len(v)} | {v.mean():.1f} | {np.median(v):.0f} | {np.percentile(v, 90):.0f} |")
    covered = sum(1 for _, _, p in data["groups"] if p)
    lines += ["", f"## Groups: {covered} of {len(data['groups'])} covered", "",
              "| group | pool share | pick share | picks |", "|---|---|---|---|"]
    n_pool, n_pick = max(data["pool_size"], 1), max(data["selected"], 1)
    for g, n, p in sorted(data["groups"], key=lambda t: -t[1])[:20]:
        lines.append(f"| {g} | {n / n_pool:.1%} | {p / n_pick:.1%} | {p} |")
    return "\n".join(lines) + "\n"


def report_png(data: dict) -> bytes:
    import matplotlib  # deferred on purpose: matplotlib (seconds), for the report's figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if data["gains"] is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.2), squeeze=False)
    ax = axes[0][0]
    top = max(int(data["pool_tokens"].max(initial=1)), 1)
    bins = np.linspace(0, top, 30)
    ax.hist(data["pool_tokens"], bins=bins, density=True, alpha=0.5, label="pool")
    ax.hist(data["pick_tokens"], bins=bins, density=True, alpha=0.5, label="picks")
    ax.set_xlabel("loss tokens per example"), ax.set_ylabel("density"), ax.legend()
    if data["gains"] is not None:
        ax = axes[0][1]
        ax.plot(np.arange(1, len(data["gains"]) + 1), data["gains"])
        ax.set_yscale("log"), ax.set_xlabel("pick rank"), ax.set_ylabel("marginal gain")
        if data["knee"] is not None:
            ax.axvline(data["knee"] + 1, linestyle="--", color="grey", label=f"knee: pick {data['knee'] + 1}")
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def curation_report(examples_uri: str, selection_uri: str, name: str) -> tuple[str, bytes]:
    data = report_data(examples_uri, selection_uri)
    return report_markdown(data, name), report_png(data)
