"""`ftclip report RUN_DIR`: what clipping did in a finished (or running) run, and what threshold to use.

Reads the per-step values every metrics.jsonl line carries, so the report sees each optimizer step whatever
`logging_steps` was. The spike rule is the live run's (`monitor.SpikeDetector`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftclip.errors import FtclipError
from ftclip.monitor import SpikeDetector, StepStats

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "report.png"
SUGGESTION_PERCENTILE = 90
SPARK = "▁▂▃▄▅▆▇█"


# A preference run's metrics (rl, reward_model), train and eval, reported first → last logged.
PREFERENCE_METRICS = ("rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                      "logps/rejected", "kl")


@dataclass
class RunHistory:
    steps: list[StepStats]
    eval_points: list[tuple[int, float]] = field(default_factory=list)
    # name (e.g. rewards/accuracy, eval_rewards/accuracy) → [(step, value)] at each logged line that has it
    preference: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _number(value) -> float:
    return float(value) if value is not None else math.nan  # "nan"/"inf" strings and None alike


def read_history(run_dir: Path) -> RunHistory:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FtclipError(f"{run_dir}: no {METRICS_FILE} (is this an ftclip output_dir?)")
    steps, evals, preference = [], [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            per_step = record.get("per_step") or {
                "step": [record["step"]], "loss": [record["loss"]], "grad_norm": [record["grad_norm"]],
                "clip_coef": [record["clip_coef"]], "threshold": [record.get("clip_threshold")],
            }
            for step, loss, norm, coef, threshold in zip(*(per_step[k] for k in (
                    "step", "loss", "grad_norm", "clip_coef", "threshold"))):
                norm = _number(norm)
                steps.append(StepStats(int(step), _number(loss), norm, _number(coef), _number(threshold),
                                       not math.isfinite(norm)))
            if "eval_loss" in record:
                evals.append((record["step"], _number(record["eval_loss"])))
            for name in PREFERENCE_METRICS:
                for key in (name, f"eval_{name}"):
                    if key in record:
                        preference.setdefault(key, []).append((record["step"], _number(record[key])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise FtclipError(f"{path}:{number}: not an ftclip metrics line ({error})") from None
    if not steps:
        raise FtclipError(f"{path}: no logged steps yet")
    return RunHistory(steps, evals, preference)


def preference_rows(history: RunHistory) -> list[tuple[str, str]]:
    """The report's lines for a preference run: each metric first → last logged (accuracy as a share)."""
    rows = []
    for name in PREFERENCE_METRICS:
        for key, label in ((name, name), (f"eval_{name}", f"eval {name}")):
            points = history.preference.get(key)
            if not points:
                continue
            show = (lambda v: f"{v:.0%}") if name == "rewards/accuracy" else (lambda v: f"{v:.4g}")
            (first_step, first), (last_step, last) = points[0], points[-1]
            rows.append((f"{label} (step {first_step} → {last_step})", f"{show(first)} → {show(last)}"))
    return rows


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _round_2(value: float) -> float:
    return float(f"{value:.2g}")


@dataclass
class Report:
    steps: int
    loss_first: float
    loss_last: float
    percentiles: dict[str, float]
    clipped_steps: int
    skipped_steps: int
    thresholds: tuple[float, float] | None  # (min, max) of the norm threshold used; None: no norm clipping
    spikes: list
    suggested: float
    suggested_clip_rate: float
    reasoning: list[str]


def analyze(history: RunHistory) -> Report:
    steps = history.steps
    finite = [s for s in steps if not s.nonfinite]
    if not finite:
        raise FtclipError("every logged step had a non-finite gradient norm; there is nothing to suggest from")
    norms = [s.norm for s in finite]
    percentiles = {f"p{p}": percentile(norms, p) for p in (10, 50, 90, 99)} | {"max": max(norms)}
    detector = SpikeDetector()
    spikes = [spike for stats in steps for spike in detector.observe(stats)] + detector.finish()
    thresholds = [s.threshold for s in finite if math.isfinite(s.threshold)]
    clipped = sum(s.clipped for s in finite)

    # The first tenth of a run has the large norms of a fresh adapter and a warming LR; judge the steady part.
    settled = finite[len(finite) // 10:] if len(finite) >= 20 else finite
    settled_norms = [s.norm for s in settled]
    suggested = _round_2(percentile(settled_norms, SUGGESTION_PERCENTILE))
    suggested_rate = sum(n > suggested for n in norms) / len(norms)
    reasoning = [
        f"The p{SUGGESTION_PERCENTILE} of the pre-clip norm over steps {settled[0].step}–{settled[-1].step} is "
        f"{percentile(settled_norms, SUGGESTION_PERCENTILE):.4g}. A fixed max_norm there leaves typical steps "
        f"untouched and rescales only the largest tenth (on this run: {suggested_rate:.0%} of steps), which is "
        "where spikes live (the AutoClip rule, frozen into one number).",
    ]
    if thresholds:
        low, high = min(thresholds), max(thresholds)
        used = f"{low:.4g}" if math.isclose(low, high) else f"{low:.4g}–{high:.4g}"
        rate = clipped / len(finite)
        clipped_steps = [s.step for s in finite if s.clipped]
        settled_rate = sum(s.clipped for s in settled) / len(settled)
        if rate > 0.5:
            verdict = (f"The run's threshold ({used}) clipped {rate:.0%} of steps: too low, it rescales ordinary "
                       "steps rather than outliers.")
        elif clipped == 0:
            verdict = (f"The run's threshold ({used}) never clipped; the largest norm was {percentiles['max']:.4g}. "
                       "It cost nothing and guarded against nothing that happened; keep it as a safety net or lower "
                       "it toward the suggestion if loss spikes appear.")
        elif rate > 0.2:
            verdict = (f"The run's threshold ({used}) clipped {rate:.0%} of steps, between steps {clipped_steps[0]} "
                       f"and {clipped_steps[-1]} ({settled_rate:.0%} after the first tenth of the run): below the "
                       "typical norm for that stretch, so there it acted on ordinary steps, not just outliers.")
        else:
            verdict = f"The run's threshold ({used}) clipped {rate:.0%} of steps: the outliers, as intended."
        reasoning.append(verdict)
    if spikes:
        jumps = [s for s in spikes if s.loss_jump]
        reasoning.append(
            f"{len(spikes)} gradient spike(s) (norm > {detector.factor:g}× the running median), {len(jumps)} with a "
            "loss jump. If loss spikes recur at this threshold, lower it (e.g. halve it) or try mode: zscore.")
    return Report(
        steps=len(steps), loss_first=steps[0].loss, loss_last=steps[-1].loss, percentiles=percentiles,
        clipped_steps=clipped, skipped_steps=len(steps) - len(finite),
        thresholds=(min(thresholds), max(thresholds)) if thresholds else None, spikes=spikes,
        suggested=suggested, suggested_clip_rate=suggested_rate, reasoning=reasoning,
    )


def sparkline(values: list[float], width: int = 64) -> str:
    """Log-scaled bars, one per bucket of steps (each showing the bucket's largest norm)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return ""
    count = min(width, len(values))
    buckets = [values[i * len(values) // count:(i + 1) * len(values) // count] for i in range(count)]
    low, high = math.log(min(finite)), math.log(max(finite))
    line = []
    for bucket in buckets:
        top = max((v for v in bucket if math.isfinite(v) and v > 0), default=None)
        if top is None:
            line.append("!")  # a bucket of non-finite steps
            continue
        level = 0 if high == low else (math.log(top) - low) / (high - low)
        line.append(SPARK[min(len(SPARK) - 1, int(level * len(SPARK)))])
    return "".join(line)


def write_plot(history: RunHistory, report: Report, destination: Path) -> Path | None:
    """report.png: loss, and the grad norm on a log scale with the threshold and clipped steps. None when
    matplotlib (the optional `report` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = history.steps
    figure, (loss_axis, norm_axis) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), constrained_layout=True)
    loss_axis.plot([s.step for s in steps], [s.loss for s in steps], color="tab:blue", lw=1, label="train loss")
    if history.eval_points:
        loss_axis.plot(*zip(*history.eval_points), "o-", color="tab:green", ms=4, label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper right")

    finite = [s for s in steps if not s.nonfinite]
    norm_axis.plot([s.step for s in finite], [s.norm for s in finite], color="tab:gray", lw=1, label="pre-clip norm")
    with_threshold = [s for s in steps if math.isfinite(s.threshold)]
    if with_threshold:
        norm_axis.step([s.step for s in with_threshold], [s.threshold for s in with_threshold], where="mid",
                       color="tab:red", lw=1.2, label="clip threshold")
    clipped = [s for s in finite if s.clipped]
    if clipped:
        norm_axis.scatter([s.step for s in clipped], [s.norm for s in clipped], s=12, color="tab:red", zorder=3,
                          label=f"clipped ({len(clipped)} steps)")
    for spike in report.spikes:
        norm_axis.annotate("spike", (spike.step, spike.norm), textcoords="offset points", xytext=(4, 4), fontsize=8)
    norm_axis.axhline(report.suggested, color="tab:purple", ls="--", lw=1,
                      label=f"suggested max_norm {report.suggested:g}")
    norm_axis.set_yscale("log")
    norm_axis.set_ylabel("gradient norm (log)")
    norm_axis.set_xlabel("optimizer step")
    norm_axis.legend(loc="best", fontsize=8)
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    os.replace(staging, destination)
    return destination
