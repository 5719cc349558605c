"""`relex demo`: a real RLVR run on a CPU, extrapolated by relex and scored against itself.

1. Load the shipped base model (a 0.4M-parameter Llama pre-trained on a mixture where 60% of the
   additions are answered carry-less; see scripts/make_demo_base.py), accuracy ~0.35.
2. Train it with GRPO on exact-match reward for `steps` steps (grpo.py), keeping the real
   checkpoints: every 2 steps in the observed window, every 10 after it.
3. Observe only the first `observe_until` steps (15% by default) and extrapolate with relex and
   with the per-parameter linear baseline to targets up to the end of the run and past it.
4. Score every real and extrapolated checkpoint on 500 fixed held-out problems (greedy), print
   the table, draw the plot, and say where extrapolation stops being reliable.
5. Train again from the same base and seed with relex in the loop (relex.loop.accelerator: every
   `cycle` steps fit the cycle and jump `jump` steps ahead in place, Adam state kept) for half
   the real steps, and count the real steps each run needs to reach accuracy thresholds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from relex.api import extrapolate
from relex.version import __version__
from relex.demo import arithmetic as A
from relex.loop.accelerator import Accelerator
from relex.errors import RelexError
from relex.output.model import refuse_existing
from relex.demo.grpo import GRPOConfig, train

BASE = Path(__file__).parent / "data" / "demo-base"
METHODS = ("relex", "linear-weights")
#: an extrapolated checkpoint within this much accuracy of the real one counts as "tracking"
TOLERANCE = 0.05
#: accuracy thresholds of the "real steps to reach" table (plus the plain run's final accuracy)
THRESHOLDS = (0.90, 0.93, 0.945)


@dataclass
class DemoResult:
    output: Path
    base_accuracy: float
    real: dict[int, float]  # step -> held-out accuracy of the real checkpoint
    predicted: dict[str, dict[int, float]]  # method -> step -> accuracy
    observe_until: int
    steps: int
    verdict: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    accelerated: dict = field(default_factory=dict)  # cycle, jump, curve, jumps
    #: relex's own backtest of the observed window (Report.horizon of its extrapolation)
    horizon: dict | None = None

    def steps_to_reach(self) -> dict[str, dict[str, int | None]]:
        """Real steps each run needed to reach each threshold (None: not reached)."""
        final = round(self.real[max(self.real)], 3)
        levels = sorted(set(THRESHOLDS) | {final})
        curves = {"plain": self.real,
                  "accelerated": {0: self.base_accuracy, **{
                      p["real_step"]: p["accuracy"] for p in self.accelerated.get("curve", [])}}}
        return {name: {f"{t:.3f}": next((s for s in sorted(c) if c[s] >= t - 5e-4), None)
                       for t in levels} for name, c in curves.items()}


def _imports():
    if not torch.cuda.is_available():  # DeepSpeed, when installed, announces its CPU fallback
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # third-party deprecation notices a demo user cannot act on
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    try:
        import matplotlib  # noqa: F401
        from transformers import LlamaForCausalLM
    except ImportError as e:
        raise RelexError(f"relex demo needs transformers and matplotlib ({e.name} is missing): "
                         f"pip install 'relex[demo]'") from None
    from relex.evaluation.generation import quiet_transformers
    quiet_transformers()
    return LlamaForCausalLM


def targets_for(steps: int, observe_until: int) -> list[int]:
    """Targets: about 8 evenly spaced steps after the window up to the end, then 1.5x and 2x."""
    stride = max(10, round((steps - observe_until) / 8 / 10) * 10)
    inside = list(range(((observe_until + stride) // 10) * 10, steps + 1, stride))
    if not inside or inside[-1] != steps:
        inside.append(steps)
    return sorted(set(inside + [steps * 3 // 2, steps * 2]))


def run_demo(output: str | Path = "relex-demo", steps: int = 400,
             observe_until: int | None = None, seed: int = 0, overwrite: bool = False,
             progress: bool = True, cycle: int | None = None, jump: int | str = "auto",
             accelerated_steps: int | None = None) -> DemoResult:
    """Train, extrapolate, evaluate, report. Writes output/{run,extrapolated,summary.json,
    demo.png}; see the module docstring. cycle / jump: the accelerated run's (cycle None: 20,
    10 with jump "auto"; jump 0 skips it); accelerated_steps: its real steps (default
    steps // 2)."""
    LlamaForCausalLM = _imports()
    output = Path(output)
    k = observe_until if observe_until is not None else max(4, round(0.15 * steps / 2) * 2)
    if not 2 <= k < steps:
        raise RelexError(f"--observe-until {k}: must be at least 2 and below --steps {steps}")
    refuse_existing(output, overwrite)
    if output.exists():
        if any(output.iterdir()) and not (output / "run").is_dir():
            raise RelexError(f"{output}: not a relex demo directory (no run/ inside); refusing "
                             f"to delete it, choose another --output")
        shutil.rmtree(output)
    targets = targets_for(steps, k)
    n_acc = steps // 2 if accelerated_steps is None else accelerated_steps
    if jump:  # refuse a bad cycle before training anything
        Accelerator(torch.nn.Linear(1, 1), cycle=cycle, jump=jump)
    timings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers on every machine
    try:
        test = A.heldout()
        model = LlamaForCausalLM.from_pretrained(BASE)
        base_acc = A.accuracy(model, test)

        # -- train, keeping checkpoints: every 2 steps while observed, every 10 after
        run = output / "run"
        keep = {s for s in range(2, k + 1, 2)} | {s for s in range(10, steps + 1, 10)}
        keep |= {t for t in targets if t <= steps}
        cfg = GRPOConfig(steps=steps, seed=seed, eval_every=10)
        real = {0: base_acc}
        started = time.perf_counter()
        with tqdm(total=steps, desc="GRPO", unit="step", disable=None if progress else True,
                  leave=False) as bar:
            def on_step(row):
                if "accuracy" in row:
                    real[row["step"]] = row["accuracy"]
                bar.set_postfix(reward=f"{row['reward']:.2f}",
                                accuracy=f"{real[max(real)]:.3f}")
                bar.update()
            train(model, run, cfg, on_step=on_step, keep=keep)
        timings["train"] = time.perf_counter() - started

        # -- extrapolate from the observed prefix, both methods, one pass each
        predicted: dict[str, dict[int, float]] = {}
        for method in METHODS:
            started = time.perf_counter()
            out = output / "extrapolated" / method
            with warnings.catch_warnings():  # far targets are the point: the verdict says so
                warnings.simplefilter("ignore", UserWarning)
                report = extrapolate(run, base=BASE, observe_until=k, targets=targets,
                                     output=out, method=method, progress=False)
            if method == "relex":
                horizon = report.horizon
            timings[f"extrapolate ({method})"] = time.perf_counter() - started
            started = time.perf_counter()
            predicted[method] = {t: A.accuracy(LlamaForCausalLM.from_pretrained(
                out / f"step-{t}"), test) for t in targets}
            timings[f"evaluate ({method})"] = time.perf_counter() - started

        # -- the same run with relex in the loop, against real steps spent
        accelerated = {}
        if jump and n_acc > 0:
            started = time.perf_counter()
            accelerated = accelerate(LlamaForCausalLM.from_pretrained(BASE), n_acc, seed,
                                     cycle, jump, progress)
            timings["train (accelerated)"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    result = DemoResult(output, base_acc, real, predicted, k, steps, timings=timings,
                        accelerated=accelerated, horizon=horizon)
    result.verdict = verdict(result)
    write_report(result, targets)
    return result


def accelerate(model, steps: int, seed: int, cycle: int | None, jump: int | str,
               progress: bool, snapshot_dtype: str = "float16", timing: bool = False,
               eval_fn=None, max_jump: int | None = None) -> dict:
    """GRPO with relex.loop.accelerator in the loop; held-out accuracy every 10 real steps.
    timing: also report the median time between optimizer steps (not deterministic).
    eval_fn: the Accelerator's held-out check (None: the guard reads the training reward).
    max_jump: jump="auto"'s cap (None: its default, 6 cycles)."""
    acc = Accelerator(model, cycle=cycle, jump=jump, snapshot_dtype=snapshot_dtype,
                      eval_fn=eval_fn, max_jump=max_jump)
    curve, held, stamps = [], [acc.memory_bytes()], []

    def after_step(s, reward, opt):
        stamps.append(time.perf_counter())
        jump = acc.step(s, reward, opt)
        held.append(acc.memory_bytes())
        return jump

    with tqdm(total=steps, desc="GRPO + relex", unit="step", disable=None if progress else True,
              leave=False) as bar:
        def on_step(row):
            if "accuracy" in row:
                curve.append({"real_step": row["step"], "accuracy": row["accuracy"],
                              "virtual_step": row["step"] + acc.jumped})
            bar.update()
        train(model, Path("unused"), GRPOConfig(steps=steps, seed=seed, eval_every=10),
              on_step=on_step, keep=set(),
              after_optimizer_step=after_step)
    return {"cycle": acc.cycle, "jump": jump, "steps": steps, "curve": curve,
            "jumps": [j.as_dict() for j in acc.jumps], "snapshot_dtype": snapshot_dtype,
            "snapshot_memory_mb": round(max(held) / 1e6, 2),
            # between two optimizer steps, jumps and evaluations included: the median is a step
            **({"median_step_s": float(np.median(np.diff(stamps)))} if timing else {})}


def verdict(r: DemoResult) -> list[str]:
    """Plain sentences: how far extrapolation tracked the real run, and where it broke."""
    lines = []
    compared = [t for t in sorted(r.predicted["relex"]) if t in r.real]
    gaps = {t: r.real[t] - r.predicted["relex"][t] for t in compared}
    last_good = max((t for t in compared if all(abs(gaps[s]) <= TOLERANCE
                                                for s in compared if s <= t)), default=None)
    final = r.real[max(r.real)]
    gain = final - r.base_accuracy
    end = r.predicted["relex"].get(r.steps)
    if last_good is not None:
        lines.append(f"relex tracks the real run within {TOLERANCE:.2f} accuracy up to step "
                     f"{last_good} ({last_good / r.observe_until:.1f}x the {r.observe_until} "
                     f"observed steps).")
    else:
        lines.append(f"relex is more than {TOLERANCE:.2f} off the real run at every compared "
                     f"step: this run is not linear enough to extrapolate.")
    if end is not None and gain > 0:
        lines.append(f"at the last step ({r.steps}) relex reaches {end:.3f} vs {final:.3f} for "
                     f"the real run: {100 * (end - r.base_accuracy) / gain:.0f}% of the RL gain "
                     f"from {r.observe_until / r.steps:.0%} of the steps.")
    if r.horizon and r.horizon.get("verified_up_to_step") is not None:
        h = r.horizon["verified_up_to_step"]
        lines.append(f"relex's own backtest of the {r.observe_until} observed steps verified "
                     f"targets up to step {h} ({r.horizon['verified_horizon_ratio']:.2f}x); "
                     f"`relex extrapolate` warns for every target past it.")
    lin = r.predicted.get("linear-weights", {})
    both = [t for t in r.predicted["relex"] if t in lin and t <= r.steps]
    if both:
        ahead = sum(lin[t] >= r.predicted["relex"][t] for t in both)
        at = (f"at step {both[-1]}: lin-w {lin[both[-1]]:.3f}, relex "
              f"{r.predicted['relex'][both[-1]]:.3f}")
        if 2 * ahead >= len(both):
            lines.append(f"the per-parameter line (lin-w) matches or beats relex at {ahead} of "
                         f"{len(both)} steps here ({at}): this run's updates lie so close to one "
                         f"direction that projecting on it removes little noise.")
        else:
            lines.append(f"relex beats the per-parameter line (lin-w) at {len(both) - ahead} of "
                         f"{len(both)} steps here ({at}): projecting on the rank-1 direction "
                         f"removes noise that the per-parameter line extrapolates.")
    worse = [t for t in compared if gaps[t] > TOLERANCE]
    if worse:
        lines.append(f"from step {worse[0]} relex falls more than {TOLERANCE:.2f} behind the "
                     f"real run (by up to {max(gaps.values()):.3f}): the real trajectory bends "
                     f"while the extrapolation follows a straight line.")
    plateau = min(s for s in r.real if r.real[s] >= max(r.real.values()) - 0.02)
    beyond = {t: a for t, a in r.predicted["relex"].items() if t > r.steps}
    if beyond:
        t, a = max(beyond.items())
        lines.append(f"past the end of the run (the real run plateaus from about step "
                     f"{plateau}) the line overshoots: at step {t} relex predicts {a:.3f}. "
                     f"Do not extrapolate past a plateau; backtest on later checkpoints first.")
    if r.accelerated:
        reach = r.steps_to_reach()
        key = f"{round(r.real[max(r.real)], 3):.3f}"
        a, p = reach["accelerated"][key], reach["plain"][key]
        best = max(c["accuracy"] for c in r.accelerated["curve"])
        cyc = f"cycle {r.accelerated['cycle']}, jump {r.accelerated['jump']}"
        if a is not None:
            lines.append(f"with relex in the loop ({cyc}) the run reaches the plain run's final "
                         f"accuracy {key} after {a} real steps (plain: {p}).")
        else:
            lines.append(f"with relex in the loop ({cyc}) the run reaches {best:.3f} in "
                         f"{r.accelerated['steps']} real steps, short of the plain run's final "
                         f"{key}.")
        back = [j for j in r.accelerated["jumps"] if j["rolled_back"]]
        if back:
            lines.append(f"the guard rolled back {len(back)} jump(s) whose reward fell.")
    return lines


def write_report(r: DemoResult, targets: list[int]) -> None:
    """summary.json, demo.png, and the table on stdout."""
    rows = []
    for t in targets:
        rows.append({"step": t, "real": r.real.get(t),
                     **{m: r.predicted[m][t] for m in METHODS}})
    summary = {"relex_version": __version__, "steps": r.steps,
               "observe_until": r.observe_until, "base_accuracy": r.base_accuracy,
               "heldout_problems": len(A.heldout()),
               "real_curve": {str(s): a for s, a in sorted(r.real.items())},
               "targets": rows, "verdict": r.verdict,
               "timings_seconds": {k: round(v, 2) for k, v in r.timings.items()},
               "grpo": GRPOConfig(steps=r.steps).as_dict(), "horizon": r.horizon}
    if r.accelerated:
        summary["accelerated"] = r.accelerated
        summary["real_steps_to_reach"] = r.steps_to_reach()
    (r.output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(r, r.output / "demo.png")


def table(r: DemoResult) -> str:
    head = f"{'step':>6} {'real':>7} {'relex':>7} {'lin-w':>7}"
    lines = [head, f"{0:>6} {r.base_accuracy:>7.3f} {'(base)':>7}"]
    for t in sorted(r.predicted["relex"]):
        real = f"{r.real[t]:.3f}" if t in r.real else "-"
        mark = "  <- observed up to here" if t == r.observe_until else ""
        lines.append(f"{t:>6} {real:>7} {r.predicted['relex'][t]:>7.3f} "
                     f"{r.predicted['linear-weights'][t]:>7.3f}{mark}")
    if r.accelerated:
        reach = r.steps_to_reach()
        lines += ["", f"real steps to reach (relex in the loop: cycle {r.accelerated['cycle']}, "
                      f"jump {r.accelerated['jump']}, {r.accelerated['steps']} real steps)",
                  f"{'accuracy':>9} {'plain':>7} {'relex':>7}"]
        for key in reach["plain"]:
            cells = [str(reach[n][key]) if reach[n][key] is not None else "-"
                     for n in ("plain", "accelerated")]
            lines.append(f"{key:>9} {cells[0]:>7} {cells[1]:>7}")
    return "\n".join(lines)


def plot(r: DemoResult, path: Path) -> None:
    from relex.analysis.report import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.axvspan(0, r.observe_until, color="tab:blue", alpha=0.12,
               label=f"observed ({r.observe_until} steps)")
    xs = sorted(r.real)
    ax.plot(xs, [r.real[s] for s in xs], color="black", lw=1.8, label="real GRPO run")
    for method, style in zip(METHODS, ("o", "x")):
        pts = sorted(r.predicted[method].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=7, ls="--", lw=1,
                label=f"extrapolated: {method}")
    if r.accelerated:
        pts = [(0, r.base_accuracy)] + [(c["real_step"], c["accuracy"])
                                        for c in r.accelerated["curve"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:green", lw=1.8,
                label=f"GRPO + relex in the loop (cycle {r.accelerated['cycle']}, jump "
                      f"{r.accelerated['jump']}), vs real steps")
        for j in r.accelerated["jumps"]:
            ax.axvline(j["real_step"], color="tab:red" if j["rolled_back"] else "tab:green",
                       lw=0.6, alpha=0.5, ymax=0.06)
    ax.axhline(r.base_accuracy, color="gray", ls=":", label="base model")
    ax.axvline(r.steps, color="gray", lw=0.8)
    ax.text(r.steps, 0.02, " end of training", color="gray", fontsize=8)
    ax.set_xlabel("GRPO step (real steps spent)")
    ax.set_ylabel("held-out accuracy (500 problems, greedy)")
    ax.set_ylim(0, 1)
    ax.set_title("RELEX on 3-digit addition: extrapolated vs real checkpoints")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
