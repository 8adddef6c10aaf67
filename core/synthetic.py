"""Reproduction of FisherSFT's synthetic experiment (Deb et al., ICML 2025, Section 5.1 / Figure 1).

Setup (what this module does, all seeded):
- Pool of `n_sentences` (1000) sentences of L = 20 tokens; token features x_ij in R^d, d = 10.
  x_ij = s_i * z_ij with z_ij ~ N(0, I_d) and a per-sentence scale s_i = exp(sigma * g_i), g_i ~ N(0, 1)
  (sigma = `scale_sigma`, 0.5; `scale_mode="token"` draws one scale per token instead). Sentences therefore
  differ in how much they say about the parameters, as they do in the paper's setup. With sigma = 0 every
  sentence is statistically the same and FisherSFT is only on a par with uniform sampling (measured; see
  docs/fishersft.md): the gain of an optimal design comes from unequal information across sentences.
- A multinomial logistic regression with `n_classes` (10) classes and true parameters Theta* in R^{d x C},
  entries N(0, theta_scale^2) with theta_scale = 1/sqrt(d) by default, so logits of a unit-scale token have
  unit variance (softmax neither flat nor saturated); token labels y_ij ~ softmax(x_ij^T Theta*).
- For every budget n in `n_grid`, each method selects n sentences: Uniform (seeded random), DensitySampling
  (the `density` selector on the sentence mean features), FisherSFT (lazy greedy log-det over token features,
  lam = 1). Greedy and both samplers are nested in n, so one ordering per run serves the whole grid.
- Theta is fitted by maximum likelihood on the selected tokens (torch L-BFGS, ridge 1e-4 * ||Theta||^2).
- Error: total-variation distance between the true and fitted class distributions,
  TV(x) = 0.5 * ||softmax(x^T Theta*) - softmax(x^T Theta_hat)||_1, at every pool token; reported as its
  maximum and its mean over the pool, averaged over `runs` independent runs (fresh Theta*, pool, labels).
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sftcurate.core.fisher_greedy import run_greedy
from sftcurate.core.inputs import mean_pool
from sftcurate.core.selectors.base import Budget, SelectorInputs
from sftcurate.core.selectors.density import DensitySelector
from sftcurate.infra import tracking
from sftcurate.infra.runners import one_thread

DEFAULTS = {"d": 10, "L": 20, "n_classes": 10, "n_sentences": 1000, "scale_sigma": 0.5, "scale_mode": "sentence",
            "theta_scale": None, "lam": 1.0,
            "ridge": 1e-4}
N_GRID = (10, 20, 50, 100, 200)
METHODS = ("uniform", "density", "fishersft")


def make_problem(rng: np.random.Generator, d: int, L: int, n_classes: int, n_sentences: int, scale_sigma: float,
                 scale_mode: str = "sentence", theta_scale: float | None = None):
    z = rng.standard_normal((n_sentences * L, d))
    if scale_mode == "sentence":
        scale = np.repeat(np.exp(scale_sigma * rng.standard_normal((n_sentences, 1))), L, axis=0)
    else:
        scale = np.exp(scale_sigma * rng.standard_normal((n_sentences * L, 1)))
    x = z * scale
    theta = (theta_scale or 1.0 / math.sqrt(d)) * rng.standard_normal((d, n_classes))
    logits = x @ theta
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = rng.random((len(x), 1))
    y = np.minimum((p.cumsum(1) < u).sum(1), n_classes - 1)
    offsets = np.arange(n_sentences + 1, dtype=np.int64) * L
    return x, y.astype(np.int64), theta, offsets


def fit_mle(x: np.ndarray, y: np.ndarray, n_classes: int, ridge: float = 1e-4, max_iter: int = 200) -> np.ndarray:
    """Multinomial logistic regression by maximum likelihood (mean NLL + ridge), torch L-BFGS, float64."""
    X = torch.as_tensor(x, dtype=torch.float64)
    Y = torch.as_tensor(y)
    theta = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ theta, Y) + ridge * (theta * theta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().numpy()


def tv_errors(x: np.ndarray, theta_true: np.ndarray, theta_hat: np.ndarray) -> tuple[float, float]:
    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    tv = 0.5 * np.abs(softmax(x @ theta_true) - softmax(x @ theta_hat)).sum(1)
    return float(tv.max()), float(tv.mean())


def orderings(x: np.ndarray, offsets: np.ndarray, n_max: int, seed: int, lam: float) -> dict[str, list[int]]:
    """Pick order of each method for the largest budget (every method is nested in n)."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    out = {"uniform": np.random.default_rng(seed).permutation(n)[:n_max].tolist()}
    inputs = SelectorInputs(pool=pa.table({"id": [str(i) for i in range(n)]}), token_counts=lengths,
                            sentence_embeddings=mean_pool(x, offsets))
    out["density"] = DensitySelector().select(inputs, Budget(examples=n_max), seed).indices
    out["fishersft"] = run_greedy(x.astype(np.float64), offsets, lam=lam, algorithm="lazy", k=n_max,
                                  device="cpu").picks
    return out


def run_once(seed: int, n_grid, params: dict) -> dict[str, dict[int, tuple[float, float]]]:
    rng = np.random.default_rng(seed)
    x, y, theta, offsets = make_problem(rng, params["d"], params["L"], params["n_classes"], params["n_sentences"],
                                        params["scale_sigma"], params["scale_mode"], params["theta_scale"])
    orders = orderings(x, offsets, max(n_grid), seed, params["lam"])
    res: dict[str, dict[int, tuple[float, float]]] = {}
    for method, order in orders.items():
        res[method] = {}
        for n in n_grid:
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order[:n]])
            theta_hat = fit_mle(x[rows], y[rows], params["n_classes"], params["ridge"])
            res[method][n] = tv_errors(x, theta, theta_hat)
    return res


def summarize(all_runs: list[dict], n_grid) -> list[dict]:
    rows = []
    for method in METHODS:
        for n in n_grid:
            mx = np.array([r[method][n][0] for r in all_runs])
            mn = np.array([r[method][n][1] for r in all_runs])
            k = len(all_runs)
            rows.append({"method": method, "n": n, "max_error": float(mx.mean()),
                         "max_error_se": float(mx.std(ddof=1) / math.sqrt(k)) if k > 1 else 0.0,
                         "mean_error": float(mn.mean()),
                         "mean_error_se": float(mn.std(ddof=1) / math.sqrt(k)) if k > 1 else 0.0})
    return rows


def write_outputs(out_dir: Path, rows: list[dict], n_grid, params: dict, runs: int) -> dict[str, Path]:
    import matplotlib  # deferred on purpose: matplotlib (seconds), for the reproduction's plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "synthetic.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["method"], r["n"]): r for r in rows}
    lines = [f"# FisherSFT synthetic experiment (d={params['d']}, L={params['L']}, classes={params['n_classes']}, "
             f"pool={params['n_sentences']} sentences, scale_sigma={params['scale_sigma']}, {runs} runs)", "",
             "Total-variation prediction error over all pool tokens, mean over runs (± standard error).", "",
             "| n | " + " | ".join(f"{m} max" for m in METHODS) + " | " + " | ".join(f"{m} mean" for m in METHODS) + " |",
             "|---|" + "---|" * (2 * len(METHODS))]
    for n in n_grid:
        cells = [f"{by[(m, n)]['max_error']:.4f} ± {by[(m, n)]['max_error_se']:.4f}" for m in METHODS]
        cells += [f"{by[(m, n)]['mean_error']:.4f} ± {by[(m, n)]['mean_error_se']:.4f}" for m in METHODS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    md_path = out_dir / "synthetic.md"
    md_path.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = {"uniform": "Uniform", "density": "DensitySampling", "fishersft": "FisherSFT"}
    for ax, key, title in ((axes[0], "max_error", "Maximum prediction error"),
                           (axes[1], "mean_error", "Mean prediction error")):
        for m in METHODS:
            ys = np.array([by[(m, n)][key] for n in n_grid])
            se = np.array([by[(m, n)][key + "_se"] for n in n_grid])
            ax.errorbar(list(n_grid), ys, yerr=se, marker="o", capsize=3, label=names[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of sentences n")
        ax.set_ylabel("TV error")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Synthetic token vectors (d={params['d']}, L={params['L']}), {runs} runs")
    fig.tight_layout()
    png_path = out_dir / "synthetic.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return {"csv": csv_path, "md": md_path, "png": png_path}


def run_synthetic(out_dir, runs: int = 20, seed: int = 0, n_grid=N_GRID, log_to_mlflow: bool = True,
                  **overrides) -> dict:
    """Run the experiment; writes synthetic.csv / .md / .png into out_dir (and logs them to MLflow).

    Returns {"rows": [...], "files": {...}, "fisher_beats_uniform": bool, "run_id": ...}."""
    params = {**DEFAULTS, **overrides}
    n_grid = tuple(int(n) for n in n_grid)
    if max(n_grid) > params["n_sentences"]:
        raise ValueError(f"n_grid: {max(n_grid)} sentences is more than the pool ({params['n_sentences']})")
    t0 = time.perf_counter()
    with one_thread():  # tiny problems: one thread is faster and does not fight other processes
        all_runs = [run_once(seed + r, n_grid, params) for r in range(runs)]
    rows = summarize(all_runs, n_grid)
    files = write_outputs(Path(out_dir), rows, n_grid, params, runs)
    by = {(r["method"], r["n"]): r for r in rows}
    beats = all(by[("fishersft", n)]["max_error"] < by[("uniform", n)]["max_error"]
                and by[("fishersft", n)]["mean_error"] < by[("uniform", n)]["mean_error"] for n in n_grid)
    result = {"rows": rows, "files": {k: str(v) for k, v in files.items()}, "fisher_beats_uniform": beats,
              "params": params, "runs": runs, "seed": seed, "n_grid": list(n_grid),
              "seconds": round(time.perf_counter() - t0, 2), "run_id": None}
    (Path(out_dir) / "synthetic.json").write_text(json.dumps(result, indent=2))
    if log_to_mlflow:
        with tracking.start_run("reproduce-synthetic", tags={"sftcurate.kind": "reproduce"},
                                params={**params, "runs": runs, "seed": seed, "n_grid": list(n_grid)}) as run_id:
            for r in rows:
                tracking.log_metrics(run_id, {f"{r['method']}.max_error": r["max_error"],
                                              f"{r['method']}.mean_error": r["mean_error"]}, step=r["n"])
            tracking.log_metrics(run_id, {"fisher_beats_uniform": float(beats)})
            for path in files.values():
                tracking.log_file(run_id, str(path), "synthetic")
            result["run_id"] = run_id
    return result
