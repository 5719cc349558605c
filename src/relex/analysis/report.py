"""`relex analyze`'s report: PNG figures, a self-contained report.html, summary.json, a CSV.

Figures are drawn with matplotlib (Agg) and embedded in the HTML as data URIs, so the report
opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

import numpy as np

from relex.analysis.backtest import MAX_REL_ERROR, RunAnalysis, TensorAnalysis


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a RelexError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        from relex.errors import RelexError
        raise RelexError("relex draws its figures with matplotlib: pip install matplotlib "
                         "(or 'relex[eval]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_report(run: RunAnalysis, out: Path, title: str) -> dict:
    """Write every artefact into `out` (an existing empty directory); return the summary."""
    summary = run.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_csv(run, out / "tensors.csv")
    plt = pyplot()
    figures = {
        "explained_variance.png": fig_explained_variance(plt, run),
        "heatmaps.png": fig_heatmaps(plt, run),
        "coefficients.png": fig_coefficients(plt, run),
        "backtest.png": fig_backtest(plt, run, summary),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    (out / "report.html").write_text(render_html(run, summary, out, list(figures), title))
    return summary


def write_csv(run: RunAnalysis, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "module", "layer", "numel"] + [f"ev_rank{r}" for r in range(1, 6)]
                   + ["r2", "slope", "outside_rank_r_mean", "verified_horizon"])
        for t in run.tensors:
            w.writerow([t.name, t.module, "" if t.layer is None else t.layer, t.numel]
                       + [f"{x:.6f}" for x in t.ev]
                       + ["" if t.r2 is None else f"{t.r2:.6f}",
                          "" if t.slope is None else f"{t.slope:.6g}",
                          f"{np.mean(t.outside):.6f}", f"{run.tensor_horizon(t):.3f}"])


# ---------------------------------------------------------------------- figures
def fig_explained_variance(plt, run: RunAnalysis):
    moving = [t for t in run.tensors if t.r2 is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ev1 = [t.ev[0] for t in moving]
    a.hist(ev1, bins=30, color="tab:blue")
    a.yaxis.get_major_locator().set_params(integer=True)
    a.set_xlabel(f"explained variance of rank 1 (window of {run.n_obs} checkpoints)")
    a.set_ylabel("tensors")
    a.set_title("Finding 1: how rank-1 is each tensor's trajectory")
    ranks = np.arange(1, 6)
    ev = np.array([t.ev for t in moving])
    if len(ev):
        b.plot(ranks, ev.mean(0), "o-", label="mean")
        b.plot(ranks, np.median(ev, 0), "s--", label="median")
        b.plot(ranks, ev.min(0), "v:", label="min")
    b.set_xticks(ranks)
    b.set_xlabel("rank")
    b.set_ylabel("explained variance")
    b.set_ylim(max(0.0, float(ev.min()) - 0.05) if len(ev) else 0.0, 1.005)
    b.legend()
    b.set_title("explained variance by rank")
    fig.tight_layout()
    return fig


def fig_heatmaps(plt, run: RunAnalysis):
    moving = [t for t in run.tensors if t.r2 is not None and t.layer is not None]
    modules = sorted({t.module for t in moving})
    layers = sorted({t.layer for t in moving})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.35 * max(len(modules), 3)))
    for ax, key, label in zip(axes, ("ev", "r2"), ("explained variance (rank 1)",
                                                   "R^2 of the coefficient's line")):
        grid = np.full((len(modules), len(layers)), np.nan)
        for t in moving:
            grid[modules.index(t.module), layers.index(t.layer)] = (t.ev[0] if key == "ev"
                                                                    else t.r2)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=np.nanmin(grid) if
                       np.isfinite(grid).any() else 0, vmax=1)
        ax.set_yticks(range(len(modules)), modules, fontsize=7)
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def representative(run: RunAnalysis, n: int = 3) -> tuple[list[TensorAnalysis], list]:
    """A few typical tensors (median EV, different modules) and the worst ones (backtest)."""
    moving = [t for t in run.tensors if t.r2 is not None]
    by_ev = sorted(moving, key=lambda t: t.ev[0])
    typical, seen = [], set()
    for t in by_ev[len(by_ev) // 2:] + by_ev[: len(by_ev) // 2][::-1]:
        if t.module not in seen:
            typical.append(t)
            seen.add(t.module)
        if len(typical) == n:
            break
    worst = sorted(moving, key=lambda t: (run.tensor_horizon(t), t.r2))
    worst = [t for t in worst if t not in typical][:n]
    return typical, worst


def fig_coefficients(plt, run: RunAnalysis):
    typical, worst = representative(run)
    chosen = [(t, "typical") for t in typical] + [(t, "worst") for t in worst]
    cols = 3
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    steps = np.array(run.steps)
    for ax, (t, kind) in zip(axes.flat, chosen):
        c = np.array(t.coefficients)
        ax.plot(steps[: run.n_obs], c[: run.n_obs], "o", ms=3, color="tab:blue",
                label="observed")
        if len(steps) > run.n_obs:
            ax.plot(steps[run.n_obs:], c[run.n_obs:], "o", ms=3, mfc="none",
                    color="tab:orange", label="after the window")
        ax.plot(steps, t.line, "-", color="black", lw=1, label="line fitted on the window")
        ax.axvspan(steps[0], steps[run.n_obs - 1], color="tab:blue", alpha=0.08)
        short = t.name if len(t.name) < 42 else "..." + t.name[-39:]
        ax.set_title(f"{kind}: {short}\nEV {t.ev[0]:.3f}, R^2 {t.r2:.3f}, verified horizon "
                     f"{run.tensor_horizon(t):.1f}x", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("rank-1 coefficient", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if chosen:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("Finding 2: the rank-1 coefficient against the step", fontsize=10)
    fig.tight_layout()
    return fig


def fig_backtest(plt, run: RunAnalysis, summary: dict):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    pairs = summary["backtest"]["pairs"]
    by_prefix: dict[int, list] = {}
    for p in pairs:
        by_prefix.setdefault(p["fit_until"], []).append(p)
    for prefix, ps in sorted(by_prefix.items()):
        ps = sorted(ps, key=lambda p: p["ratio"])
        a.plot([p["ratio"] for p in ps], [p["rel_error"] for p in ps], ".-",
               label=f"fit on steps <= {prefix}")
        b.plot([p["ratio"] for p in ps], [p["cosine"] for p in ps], ".-")
    if summary["oracle"]:
        o = summary["oracle"]
        a.plot([p["ratio"] for p in o], [p["rel_error"] for p in o], "k--", lw=1.5,
               label="fit on the window, later checkpoints")
        b.plot([p["ratio"] for p in o], [p["cosine"] for p in o], "k--", lw=1.5)
    a.axhline(MAX_REL_ERROR, color="red", lw=0.8)
    horizon = summary["backtest"]["verified_horizon_ratio"]
    a.axvline(horizon, color="red", lw=0.8, ls=":")
    a.text(horizon, MAX_REL_ERROR, f" verified to {horizon:.2f}x", color="red", fontsize=8,
           va="bottom")
    a.set_xlabel("horizon ratio (target step / last fitted step)")
    b.set_xlabel("horizon ratio (target step / last fitted step)")
    a.set_ylabel("relative error of the predicted delta")
    b.set_ylabel("cosine(predicted delta, real delta)")
    a.set_title("Backtest: whole-model error vs horizon", fontsize=10)
    b.set_title("Backtest: direction", fontsize=10)
    a.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- HTML
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(run: RunAnalysis, s: dict, out: Path, figures: list[str], title: str) -> str:
    f1, f2, bt = s["finding1_explained_variance"], s["finding2_linearity"], s["backtest"]
    est = bt["estimated_limit_ratio"]
    last = run.observed_steps[-1]
    verdict = (f"Every backtest up to <b>{bt['verified_horizon_ratio']:.2f}x</b> the fitted "
               f"window kept the whole-model error below {MAX_REL_ERROR:.2f}: with this window "
               f"(last observed step {last}) targets up to step "
               f"<b>{bt['verified_up_to_step']}</b> are covered by evidence.")
    if est is not None:
        verdict += (f" The error trend reaches {MAX_REL_ERROR:.2f} near {est:.1f}x (step "
                    f"{int(est * last)}): beyond that, expect the prediction to drift off.")
    oracle = ""
    if s["oracle"]:
        rows = s["oracle"]
        every = max(1, len(rows) // 12)  # a dozen rows; summary.json has them all
        rows = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])
        oracle = "<h2>Oracle: later checkpoints vs the window's fit</h2>" + _table(
            [[o["step"], o["ratio"], o["rel_error"], o["cosine"], o["norm_ratio"],
              o["in_window_subspace"]] for o in rows],
            ["step", "horizon ratio", "relative error", "cosine", "|pred|/|real|",
             "share in window subspace"])
        oracle += ("<p>A falling share in the window's subspace means the direction drifts; a "
                   "norm ratio moving away from 1 means the speed does.</p>")
    modules = _table([[k, v["tensors"], v["explained_variance_rank1"], v["r2"],
                       v["verified_horizon_min"]] for k, v in s["by_module"].items()],
                     ["module", "tensors", "EV rank 1 (mean)", "R^2 (mean)",
                      "verified horizon (min)"])
    worst = _table([[w["name"], w["verified_horizon"], w["explained_variance_rank1"], w["r2"]]
                    for w in s["worst_tensors"]],
                   ["tensor", "verified horizon", "EV rank 1", "R^2"])
    share = f1["share_of_tensors_rank1_at_least"]
    css = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1150px;margin:2em auto;"
           "padding:0 1em;color:#222}img{max-width:100%}table{border-collapse:collapse;"
           "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:12px;"
           "text-align:right}td:first-child,th:first-child{text-align:left}"
           ".note{background:#fff4e5;border-left:4px solid #f0a030;padding:.6em 1em}")
    fig = {name: _img(out / name) for name in figures}
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>{css}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(run.observed_steps)} observed checkpoints (steps {run.observed_steps[0]} to {last})
{f"and {len(run.later_steps)} later ones" if run.later_steps else "and no later ones"};
{s['moving_tensors']} of {s['tensors']} tensors move; rank {s['rank']}, {s['fit']} fit.</p>
<h2>Can this run be extrapolated, and how far?</h2>
<p>{verdict}</p>
<p class="note">{html.escape(s['note'])}</p>
{fig['backtest.png']}
<p>Rule: {html.escape(bt['rule'])}. The relative error includes each real checkpoint's
step-to-step noise, which no extrapolation predicts; at the shortest horizons it is that noise
floor.</p>
{oracle}
<h2>Finding 1: the trajectory is (nearly) rank 1</h2>
<p>Explained variance of rank 1: mean {f1['by_rank_mean'][0] if f1['by_rank_mean'] else '-'},
median {f1['rank1_median']}, min {f1['rank1_min']}, parameter-weighted mean
{f1['rank1_param_weighted_mean']}. Share of tensors with rank-1 EV at least 0.90 / 0.95 / 0.99:
{share.get('0.90')} / {share.get('0.95')} / {share.get('0.99')}.
Mean by rank 1..5: {', '.join(str(x) for x in f1['by_rank_mean'])}.</p>
{fig['explained_variance.png']}
{fig['heatmaps.png']}
<h2>Finding 2: the coefficient grows linearly with the step</h2>
<p>R^2 of the line: mean {f2['r2_mean']}, median {f2['r2_median']}, min {f2['r2_min']}.</p>
{fig['coefficients.png']}
<h2>Denoising</h2>
<p>Share of each observed update outside the rank-{s['rank']} subspace (whole model):
{', '.join(f'step {k}: {v}' for k, v in s['denoising_outside_rank_r'].items())}.</p>
<h2>By module type</h2>{modules}
<h2>Tensors with the shortest verified horizon</h2>{worst}
<p>Per-tensor numbers: tensors.csv; everything above: summary.json.</p>
</body></html>
"""
