"""Adaptive thresholds against plain-Python references, and the warnings an operator sees."""

from __future__ import annotations

import io
import math
import statistics

import pytest
import torch
from rich.console import Console

import ftclip.train as train_module
from ftclip.clip import PercentileThreshold, ZScoreThreshold
from ftclip.monitor import ClipMonitor, SpikeDetector, StepStats
from ftclip.recipe import load_recipe

# A drifting norm sequence with two spikes and one non-finite step.
NORMS = [2.0 + 0.5 * math.sin(i / 3) + 0.01 * i for i in range(80)]
NORMS[40] = 30.0
NORMS[55] = math.inf
NORMS[60] = 12.0


def numpy_style_percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile's default (and AutoClip) does."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def autoclip_reference(norms, max_norm, p, history_size, warmup):
    history, thresholds = [], []
    for step, norm in enumerate(norms, start=1):
        history.append(norm if math.isfinite(norm) else None)
        history = history[-history_size:]
        finite = [h for h in history if h is not None]
        thresholds.append(max_norm if step <= warmup else numpy_style_percentile(finite, p))
    return thresholds


def zclip_reference(norms, max_norm, z, alpha, warmup):
    thresholds, seen, mean, var = [], [], None, None
    for step, norm in enumerate(norms, start=1):
        if step <= warmup:
            if math.isfinite(norm):
                seen.append(norm)
            if step == warmup:
                mean, var = statistics.fmean(seen), statistics.pvariance(seen)
            thresholds.append(max_norm)
            continue
        threshold = mean + z * math.sqrt(var)
        thresholds.append(threshold)
        if math.isfinite(norm):
            clipped = min(norm, threshold)
            mean = alpha * mean + (1 - alpha) * clipped
            var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
    return thresholds


@pytest.mark.parametrize("history_size", [1000, 16])
def test_auto_mode_follows_autoclip_percentile(history_size):
    policy = PercentileThreshold(max_norm=1.0, percentile=90, history_size=history_size, warmup_steps=10)
    got = [float(policy(torch.tensor(n))) for n in NORMS]
    expected = autoclip_reference(NORMS, 1.0, 90, history_size, 10)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got[:10] == [1.0] * 10


def test_zscore_mode_follows_zclip_ema():
    policy = ZScoreThreshold(max_norm=1.0, z_threshold=2.5, ema_decay=0.97, warmup_steps=25)
    got = [float(policy(torch.tensor(n))) for n in NORMS]
    expected = zclip_reference(NORMS, 1.0, 2.5, 0.97, 25)
    assert got == pytest.approx(expected, rel=1e-5)
    # The spike at step 41 is judged against statistics it did not inflate: the threshold stays near 3.
    assert got[41] < 4.0 and NORMS[40] > 5 * got[40]


def test_adaptive_state_round_trips():
    first = ZScoreThreshold(1.0, 2.5, 0.97, 5)
    for n in NORMS[:30]:
        first(torch.tensor(n))
    second = ZScoreThreshold(1.0, 2.5, 0.97, 5)
    second.load_state_dict(first.state_dict())
    assert [float(first(torch.tensor(n))) for n in NORMS[30:]] == [float(second(torch.tensor(n))) for n in NORMS[30:]]


def steps_of(norms, losses=None, threshold=1.0):
    losses = losses or [1.0] * len(norms)
    return [StepStats(i + 1, loss, norm, min(1.0, threshold / norm) if math.isfinite(norm) else math.nan, threshold,
                      not math.isfinite(norm)) for i, (norm, loss) in enumerate(zip(norms, losses))]


def test_every_step_clipped_warns_once_then_summarizes():
    monitor = ClipMonitor("norm", summary_every=100)
    notices = monitor.observe(steps_of([3.0] * 250)) + monitor.finish(250)
    texts = [n.message for n in notices]
    assert sum(t.startswith("Gradient norm clipped at step 1") for t in texts) == 1
    summaries = [t for t in texts if t.startswith("Gradient norm clipped on")]
    assert summaries == [
        "Gradient norm clipped on 100 of the last 100 steps (steps 2–101); largest pre-clip norm 3 at step 2, threshold 1",
        "Gradient norm clipped on 100 of the last 100 steps (steps 102–201); largest pre-clip norm 3 at step 102, threshold 1",
        "Gradient norm clipped on 49 of the last 49 steps (steps 202–250); largest pre-clip norm 3 at step 202, threshold 1",
    ]
    loud = [n for n in notices if n.loud]
    assert len(loud) == 1 and loud[0].message.startswith("Clipping on 100% of the last 10 steps")


def test_rarely_clipped_run_gets_no_loud_warning():
    norms = [0.5] * 60
    norms[30] = 1.5
    notices = ClipMonitor("norm").observe(steps_of(norms))
    assert [n.loud for n in notices] == [False]


def test_spike_with_loss_jump_is_loud_and_spike_alone_is_not():
    norms = [1.0 + 0.01 * (i % 5) for i in range(40)]
    losses = [2.0] * 40
    norms[20], losses[21] = 9.0, 3.5  # spike, and the next step's loss jumps
    norms[30] = 8.0  # spike, loss flat
    detector = SpikeDetector()
    spikes = [s for stats in steps_of(norms, losses, threshold=100.0) for s in detector.observe(stats)]
    spikes += detector.finish()
    assert [(s.step, s.loss_jump) for s in spikes] == [(21, True), (31, False)]
    assert spikes[0].loss_after == 3.5 and spikes[0].median_norm == pytest.approx(1.02)


def test_nonfinite_steps_count_consecutively():
    monitor = ClipMonitor("norm")
    monitor.observe(steps_of([1.0, math.nan, math.inf, math.nan]))
    assert monitor.consecutive_skips == 3
    monitor.observe(steps_of([0.5]))
    assert monitor.consecutive_skips == 0


# ---------------------------------------------------------------- through the real training loop


def run_and_capture(path, **kwargs):
    buffer = io.StringIO()
    result = train_module.train(load_recipe(path), Console(file=buffer, width=400), **kwargs)
    return result, buffer.getvalue()


def test_tiny_threshold_run_warns_once_with_a_summary(make_recipe):
    path = make_recipe(max_steps=12, gradient_clipping={"mode": "norm", "max_norm": 1e-4})
    result, output = run_and_capture(path)
    assert result.clipped_steps == 12
    assert output.count("Gradient norm clipped at step") == 1
    assert output.count("Gradient norm clipped on 11 of the last 11 steps (steps 2–12)") == 1
    assert output.count("Clipping on 100% of the last 10 steps") == 1


def test_injected_gradient_spike_is_flagged(make_recipe, monkeypatch):
    real = train_module.forward_backward
    calls = {"n": 0}

    def spiking(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 15:  # blow this step's gradient up 50×, as a bad batch would
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.mul_(50)
        return loss

    monkeypatch.setattr(train_module, "forward_backward", spiking)
    path = make_recipe(max_steps=20, micro_batch_size=8, logging_steps=5, learning_rate=1e-3)
    result, output = run_and_capture(path)
    assert "gradient spike at step 15" in output
    flagged = [r for r in result.records if r["spike_steps"]]
    assert [r["spike_steps"] for r in flagged] == [[15]]
    per_step = [n for r in result.records for n in r["per_step"]["grad_norm"]]
    assert per_step[14] > 20 * statistics.median(per_step[:14])


@pytest.mark.parametrize("mode", ["auto", "zscore"])
def test_adaptive_modes_train_and_log_their_threshold(make_recipe, mode):
    path = make_recipe(max_steps=8, gradient_clipping={"mode": mode, "warmup_steps": 3, "max_norm": 5.0})
    result, _ = run_and_capture(path)
    thresholds = [t for r in result.records for t in r["per_step"]["threshold"]]
    assert thresholds[:3] == [5.0, 5.0, 5.0]
    assert all(t is not None and t > 0 for t in thresholds) and len(set(thresholds[3:])) > 1
    for record in result.records:
        assert record["post_clip_norm"] <= record["clip_threshold"] * (1 + 1e-5)
