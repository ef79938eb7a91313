"""The operator's eye on clipping: turns per-step clip outcomes (already read back to the host, once per
logging window) into warnings a person can act on, without flooding the terminal.

- "Gradient norm clipped": the first clipped step is shown in full; later ones are summarized every
  `summary_every` steps and at the end of the run.
- A louder warning when clipping stays on for more than half of the recent steps: the threshold is then
  likely too low, and norm clipping has turned into normalized gradient descent (the step size no longer
  follows the learning-rate schedule).
- Spikes: a pre-clip norm more than `factor` × the running median of recent norms. A spike alone is noted;
  a spike that coincides with a loss jump (this step's or the next step's loss) is the loud one.

The same `SpikeDetector` runs in `ftclip report`, so the live run and the report agree on what a spike is.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class StepStats:
    step: int
    loss: float
    norm: float  # pre-clip
    coef: float  # 1.0 = not clipped
    threshold: float  # nan in value/off modes
    nonfinite: bool

    @property
    def clipped(self) -> bool:
        return self.coef < 1.0


@dataclass
class Spike:
    step: int
    norm: float
    median_norm: float
    loss_before: float  # median of the recent losses
    loss_after: float  # the larger of this step's and the next step's loss
    loss_jump: bool

    def describe(self) -> str:
        ratio = self.norm / self.median_norm
        text = (f"gradient spike at step {self.step}: pre-clip norm {self.norm:.4g} = {ratio:.1f}× "
                f"the running median {self.median_norm:.4g}")
        if self.loss_jump:
            text += f", and the loss jumped {self.loss_before:.4g} → {self.loss_after:.4g}"
        return text


@dataclass
class SpikeDetector:
    """Norm > factor × median of the last `window` finite norms (after `min_history` of them); a loss jump is
    a loss more than `loss_jump` (relative) above the median of the recent losses, at this step or the next."""

    factor: float = 5.0
    window: int = 50
    min_history: int = 10
    loss_jump: float = 0.25
    pending: Spike | None = None  # waits one step for the next loss

    def __post_init__(self) -> None:
        self.norms: deque[float] = deque(maxlen=self.window)
        self.losses: deque[float] = deque(maxlen=self.window)

    def observe(self, stats: StepStats) -> list[Spike]:
        """Feed one step; returns the spikes now complete (a spike completes one step after it happens)."""
        done = []
        if self.pending is not None:
            done.append(self._settle(self.pending, stats.loss))
            self.pending = None
        if not math.isfinite(stats.norm):
            return done
        if len(self.norms) >= self.min_history:
            median_norm = statistics.median(self.norms)
            if median_norm > 0 and stats.norm > self.factor * median_norm:
                median_loss = statistics.median(self.losses) if self.losses else math.nan
                self.pending = Spike(stats.step, stats.norm, median_norm, median_loss, stats.loss, False)
        self.norms.append(stats.norm)
        if math.isfinite(stats.loss):
            self.losses.append(stats.loss)
        return done

    def finish(self) -> list[Spike]:
        spike, self.pending = self.pending, None
        return [self._settle(spike, math.nan)] if spike else []

    def _settle(self, spike: Spike, next_loss: float) -> Spike:
        after = max((loss for loss in (spike.loss_after, next_loss) if math.isfinite(loss)), default=math.nan)
        spike.loss_after = after
        spike.loss_jump = math.isfinite(spike.loss_before) and after > (1 + self.loss_jump) * spike.loss_before
        return spike


@dataclass
class Notice:
    message: str
    loud: bool = False


class ClipMonitor:
    """Consumes StepStats in step order and returns the warnings to show."""

    def __init__(self, mode: str, summary_every: int = 100, rate_window: int = 50, min_rate_steps: int = 10,
                 high_rate: float = 0.5):
        self.mode = mode
        self.summary_every = summary_every
        self.recent_clips: deque[bool] = deque(maxlen=rate_window)
        self.recent_norms: deque[float] = deque(maxlen=rate_window)
        self.min_rate_steps, self.high_rate = min_rate_steps, high_rate
        self.high_rate_warned = False
        self.first_clip_shown = False
        self.unshown: list[StepStats] = []  # clipped steps since the last message about clipping
        self.last_summary_step = 0
        self.spikes = SpikeDetector()
        self.spike_log: list[Spike] = []
        self.consecutive_skips = 0

    def observe(self, steps: list[StepStats]) -> list[Notice]:
        warnings: list[Notice] = []
        for stats in steps:
            warnings += self._observe_one(stats)
        return warnings

    def _observe_one(self, stats: StepStats) -> list[Notice]:
        warnings = [self._spike_warning(spike) for spike in self.spikes.observe(stats)]
        if stats.nonfinite:
            self.consecutive_skips += 1
            warnings.append(Notice(f"non-finite gradient norm ({stats.norm}) at step {stats.step}: step skipped, "
                                     "weights and optimizer state left unchanged"))
            return warnings
        self.consecutive_skips = 0
        self.recent_clips.append(stats.clipped)
        self.recent_norms.append(stats.norm)
        if stats.clipped:
            if not self.first_clip_shown:
                self.first_clip_shown = True
                self.last_summary_step = stats.step
                warnings.append(Notice(
                    f"Gradient norm clipped at step {stats.step}: pre-clip norm {stats.norm:.4g} > threshold "
                    f"{stats.threshold:.4g} (gradient scaled by {stats.coef:.3g}). Further clips are summarized "
                    f"every {self.summary_every} steps."))
            else:
                self.unshown.append(stats)
        if stats.step - self.last_summary_step >= self.summary_every and self.unshown:
            warnings.append(self._clip_summary(stats.step))
        warnings += self._rate_warning()
        return warnings

    def finish(self, last_step: int) -> list[Notice]:
        warnings = [self._spike_warning(spike) for spike in self.spikes.finish()]
        if self.unshown:
            warnings.append(self._clip_summary(last_step))
        return warnings

    def _clip_summary(self, step: int) -> Notice:
        clipped = self.unshown
        largest = max(clipped, key=lambda s: s.norm)
        span = step - self.last_summary_step
        self.unshown, self.last_summary_step = [], step
        return Notice(
            f"Gradient norm clipped on {len(clipped)} of the last {span} steps (steps {clipped[0].step}–"
            f"{clipped[-1].step}); largest pre-clip norm {largest.norm:.4g} at step {largest.step}, "
            f"threshold {largest.threshold:.4g}")

    def _rate_warning(self) -> list[Notice]:
        # AutoClip below its 50th percentile clips most steps by design; the warning would only be noise there.
        if self.mode == "auto" or len(self.recent_clips) < self.min_rate_steps:
            return []
        rate = sum(self.recent_clips) / len(self.recent_clips)
        if rate <= self.high_rate:
            if rate < self.high_rate / 2:
                self.high_rate_warned = False  # re-arm once the rate has clearly recovered
            return []
        if self.high_rate_warned:
            return []
        self.high_rate_warned = True
        median_norm = statistics.median(self.recent_norms)
        return [Notice(
            f"Clipping on {rate:.0%} of the last {len(self.recent_clips)} steps: the threshold is likely too low "
            f"(median pre-clip norm {median_norm:.4g}). When nearly every step is clipped, clipping no longer "
            "singles out the outlier steps it is meant to tame: Adam largely normalizes a constant rescale away, and "
            "SGD's step size is then set by the threshold instead of the learning rate. Consider a max_norm near the "
            "typical norm, or run `ftclip report` on the output folder for a suggested value.", loud=True)]

    def _spike_warning(self, spike: Spike) -> Notice:
        self.spike_log.append(spike)
        if spike.loss_jump:
            return Notice(spike.describe() + ". A loss spike that follows a gradient spike is what clipping is "
                            "for; if they recur, lower max_norm (e.g. 1.0 → 0.5) or the learning rate.", loud=True)
        return Notice(spike.describe() + " (the loss did not jump)")
