"""The clip engine: every gradient-clipping decision in ftclip lives here.

Two layers:
- torch-compatible functions, `clip_grad_norm_` and `clip_grad_value_`, for any parameters;
- `GradientClipper`, the training loop's clip step, over `FlatGrads`: one contiguous gradient buffer per
  (device, dtype) with every `param.grad` a view into it. The norm is then one read pass per buffer, and
  the scale is either one multiply per buffer or, for torch's fused Adam/AdamW/SGD, no pass at all: the
  optimizer's own kernel applies it through `grad_scale` and skips a non-finite step through `found_inf`
  (the hooks GradScaler uses).

Nothing here reads a value back to the host during a step: norms and coefficients stay device tensors
until the loop logs them. The one exception is named where it happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ftclip.recipe import GradientClipping

# Added to the norm before dividing, as torch does, so a zero gradient gives a finite coefficient.
EPS = 1e-6
# Norms are reduced per row of this many values and the row results summed in float64: one flat fp32
# reduction over tens of millions of values drifts by ~1e-3 on the CPU; per-row partials stay exact to ~1e-9.
ROW_SIZE = 4096
# On the CPU, fp32 partials of half-precision buffers come from cache-sized chunks: reducing a whole buffer
# with dtype=float32 materializes a full fp32 copy first (5x slower than torch's bf16 norm, measured).
HALF_CHUNK_SIZE = 65536


def _chunks_half_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and device.type == "cpu"


def _group_by_device_and_dtype(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def _combine(partial_norms: list[Tensor], norm_type: float) -> Tensor:
    """Global norm from per-group norms, as if all values were one vector; float32 on the first device."""
    if not partial_norms:
        return torch.zeros((), dtype=torch.float32)
    device = partial_norms[0].device
    stacked = torch.stack([norm.reshape(()).to(device) for norm in partial_norms])
    return torch.linalg.vector_norm(stacked, norm_type).to(torch.float32)


def total_norm(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """Norm of a list of gradients via `torch._foreach_norm` per (device, dtype), accumulated in fp32.

    Unlike torch's, the result is float32 whatever the gradients' dtype: a bf16 norm has 3 significant
    digits, and fp16 gradients whose norm passes 65,504 would give inf and zero every gradient.
    """
    norm_type = float(norm_type)
    per_group = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, norm_type, dtype=torch.float32)), norm_type)
        for group in _group_by_device_and_dtype(grads).values()
    ]
    return _combine(per_group, norm_type)


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)), computed on the norm's device."""
    return torch.clamp(max_norm / (norm + EPS), max=1.0)


def _scale_(grads: list[Tensor], coefficient: Tensor) -> None:
    for (device, dtype), group in _group_by_device_and_dtype(grads).items():
        # Cast to the gradients' dtype: a mismatch sends the foreach multiply down a per-tensor slow path.
        torch._foreach_mul_(group, coefficient.to(device=device, dtype=dtype))


def _as_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Drop-in for `torch.nn.utils.clip_grad_norm_`: scales gradients in place so their global norm is
    at most `max_norm`, and returns the norm measured *before* clipping (float32, on the device)."""
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    norm = total_norm(grads, norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):  # a host read, as in torch, only when asked for
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. Set error_if_nonfinite=False to scale by it anyway."
        )
    if grads:
        _scale_(grads, clip_coefficient(norm, max_norm))
    return norm


@torch.no_grad()
def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Drop-in for `torch.nn.utils.clip_grad_value_`: clamps every gradient element to ±clip_value."""
    _clamp_([p.grad for p in _as_list(parameters) if p.grad is not None], clip_value)


def _clamp_(grads: list[Tensor], clip_value: float) -> None:
    for group in _group_by_device_and_dtype(grads).values():
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)


class FlatGrads:
    """One contiguous, zero-padded gradient buffer per (device, dtype) of the trainable parameters, with
    each `param.grad` a view into it. Autograd accumulates into existing gradients in place, so the views
    survive backward and gradient accumulation; `zero_()` clears the buffers and never sets grads to None.
    """

    def __init__(self, parameters: Iterable[Tensor], row_size: int = ROW_SIZE):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.row_size = row_size
        self.buffers: list[Tensor] = []
        self._views: list[tuple[Tensor, int]] = []  # (param, data_ptr of its view), to check views are still ours
        for (device, dtype), params in _group_by_device_and_dtype(self.parameters).items():
            numel = sum(p.numel() for p in params)
            pad_to = HALF_CHUNK_SIZE if _chunks_half_on_cpu(dtype, device) else row_size
            buffer = torch.zeros(math.ceil(max(numel, 1) / pad_to) * pad_to, device=device, dtype=dtype)
            offset = 0
            for param in params:
                param.grad = buffer[offset : offset + param.numel()].view_as(param)
                self._views.append((param, param.grad.data_ptr()))
                offset += param.numel()
            self.buffers.append(buffer)

    def intact(self) -> bool:
        """False when something replaced a grad (e.g. `optimizer.zero_grad(set_to_none=True)`)."""
        return all(param.grad is not None and param.grad.data_ptr() == pointer for param, pointer in self._views)

    def zero_(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def norm(self, norm_type: float = 2.0) -> Tensor:
        """Global norm in one read pass per buffer, float32; the padding is zero and changes nothing."""
        return _combine([self._buffer_norm(buffer, float(norm_type)) for buffer in self.buffers], float(norm_type))

    def _buffer_norm(self, buffer: Tensor, norm_type: float) -> Tensor:
        if math.isinf(norm_type):
            # One pass for both extremes; abs() first would be a second pass (and a copy).
            low, high = torch.aminmax(buffer)
            return torch.maximum(high.abs(), low.abs()).to(torch.float32)
        half = buffer.dtype in (torch.float16, torch.bfloat16)
        # Half-precision values are reduced with fp32 accumulation *and* fp32 results: fp16 row norms overflow.
        if _chunks_half_on_cpu(buffer.dtype, buffer.device):  # padded to whole chunks in __init__
            chunks = list(buffer.view(-1, HALF_CHUNK_SIZE).unbind(0))
            row_norms = torch.stack(torch._foreach_norm(chunks, norm_type, dtype=torch.float32))
        else:
            rows = buffer.view(-1, self.row_size)
            row_norms = torch.linalg.vector_norm(rows, norm_type, dim=1, dtype=torch.float32 if half else None)
        exact = torch.float64 if buffer.device.type in ("cpu", "cuda") else torch.float32
        return torch.linalg.vector_norm(row_norms.to(exact), norm_type)

    def scale_(self, coefficient: Tensor) -> None:
        for buffer in self.buffers:
            buffer.mul_(coefficient.to(device=buffer.device, dtype=buffer.dtype))

    def clamp_(self, max_value: float) -> None:
        for buffer in self.buffers:
            buffer.clamp_(-max_value, max_value)


def optimizer_applies_grad_scale(optimizer: torch.optim.Optimizer | None) -> bool:
    """True for torch's fused Adam/AdamW/SGD, whose kernels divide grads by `optimizer.grad_scale` and
    skip the update (step counts included) when `optimizer.found_inf` is 1."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return False
    return all(group.get("fused") for group in optimizer.param_groups)


# ---------------------------------------------------------------- thresholds: fixed and adaptive
#
# Each threshold is called once per step with that step's pre-clip norm (a device tensor) and returns the
# threshold to clip it against (a float32 device tensor). State lives in device tensors and the step count
# on the host (known without asking the device), so no threshold ever syncs.


class FixedThreshold:
    """mode: norm — the recipe's max_norm, every step."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm
        self._value: Tensor | None = None  # made once: per step it would be an allocation and, on CUDA, a fill

    def __call__(self, norm: Tensor) -> Tensor:
        if self._value is None or self._value.device != norm.device:
            self._value = torch.full((), self.max_norm, dtype=torch.float32, device=norm.device)
        return self._value

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PercentileThreshold:
    """mode: auto — AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks"): append this step's norm to the history, clip at the history's p-th percentile
    (linear interpolation, numpy's default). The history is a ring of the last `history_size` finite norms
    (the paper keeps all of them; a ring bounds memory and lets the threshold follow a drifting run).
    During `warmup_steps` the history fills but the fixed max_norm clips."""

    def __init__(self, max_norm: float, percentile: float, history_size: int, warmup_steps: int):
        self.quantile = percentile / 100.0
        self.history_size, self.warmup_steps = history_size, warmup_steps
        self.history: Tensor | None = None  # nan = empty slot or a non-finite step; nanquantile skips both
        self.steps = 0
        self.fixed = FixedThreshold(max_norm)

    def __call__(self, norm: Tensor) -> Tensor:
        if self.history is None:
            self.history = torch.full((self.history_size,), math.nan, dtype=torch.float32, device=norm.device)
        norm = norm.to(torch.float32)
        self.history[self.steps % self.history_size] = torch.where(torch.isfinite(norm), norm, math.nan)
        self.steps += 1
        fixed = self.fixed(norm)
        if self.steps <= self.warmup_steps:
            return fixed
        threshold = torch.nanquantile(self.history, self.quantile)
        return torch.where(torch.isfinite(threshold), threshold, fixed)  # every norm so far non-finite

    def state_dict(self) -> dict:
        return {"history": self.history, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.steps = state["history"], state["steps"]


class ZScoreThreshold:
    """mode: zscore — ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"):
    an EMA of the norm's mean μ and variance σ²; a norm above μ + z·σ is clipped to exactly that, and the
    EMA is fed the clipped norm, so a spike does not inflate the statistics that judge the next one.
    Warm-up clips at the fixed max_norm and initializes μ, σ² as the mean and variance of its finite norms."""

    def __init__(self, max_norm: float, z_threshold: float, ema_decay: float, warmup_steps: int):
        self.z, self.decay, self.warmup_steps = z_threshold, ema_decay, warmup_steps
        self.sums: Tensor | None = None  # warm-up: count, sum, sum of squares of the finite norms
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.steps = 0
        self.fixed = FixedThreshold(max_norm)

    def __call__(self, norm: Tensor) -> Tensor:
        norm = norm.to(torch.float32)
        finite = torch.isfinite(norm)
        fixed = self.fixed(norm)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            if self.sums is None:
                self.sums = torch.zeros(3, dtype=torch.float64, device=norm.device)
            value = torch.where(finite, norm, 0.0).to(torch.float64)
            self.sums += torch.stack([finite.to(torch.float64), value, value * value])
            if self.steps == self.warmup_steps:
                count, total, squares = self.sums.unbind()
                count = count.clamp(min=1)
                self.mean = (total / count).to(torch.float32)
                self.var = (squares / count - (total / count) ** 2).clamp(min=0).to(torch.float32)
            return fixed
        threshold = self.mean + self.z * self.var.sqrt()
        clipped = torch.minimum(norm, threshold)
        mean = self.decay * self.mean + (1 - self.decay) * clipped
        var = self.decay * self.var + (1 - self.decay) * (clipped - mean) ** 2
        self.mean = torch.where(finite, mean, self.mean)  # a non-finite step leaves the statistics alone
        self.var = torch.where(finite, var, self.var)
        return threshold

    def state_dict(self) -> dict:
        return {"sums": self.sums, "mean": self.mean, "var": self.var, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.mean, self.var, self.steps = state["sums"], state["mean"], state["var"], state["steps"]


def build_threshold(config: GradientClipping):
    """The threshold policy for a norm-clipping mode; None for value and off."""
    if config.mode == "norm":
        return FixedThreshold(config.max_norm)
    if config.mode == "auto":
        return PercentileThreshold(config.max_norm, config.percentile, config.history_size, config.warmup_steps)
    if config.mode == "zscore":
        return ZScoreThreshold(config.max_norm, config.z_threshold, config.ema_decay, config.warmup_steps)
    return None


@dataclass
class ClipOutcome:
    """What one clip step did, as device tensors; read back only when the loop logs."""

    pre_clip_norm: Tensor  # float32
    clip_coef: Tensor  # float32; 1.0 when nothing was scaled
    nonfinite: Tensor  # float32 0/1, GradScaler's found_inf convention
    threshold: Tensor  # float32 norm threshold this step; nan in value and off modes

    @property
    def post_clip_norm(self) -> Tensor:
        return self.pre_clip_norm * self.clip_coef


class GradientClipper:
    """The clip step of the training loop: measure, decide and scale without a host sync.

    Usage per optimizer step: backward (× accumulation) → `outcome = clipper.clip()` →
    `clipper.optimizer_step(outcome)` → scheduler → `clipper.zero_grad()`.
    """

    def __init__(
        self,
        config: GradientClipping,
        parameters: Iterable[Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        flat: bool = True,
        sharded: bool = False,
    ):
        """sharded: the gradients are FSDP2 DTensor shards. Each rank then reduces its local shards, and one
        all-reduce of the p-th powers (max for inf) gives the exact global norm, with no gathering of the
        gradients themselves (torchtitan's approach). FSDP owns those gradient tensors, so no flat buffer;
        the scale is a multiply on the local shards."""
        self.config = config
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimizer = optimizer
        self.sharded = sharded
        self.flat_grads = FlatGrads(self.parameters) if flat and not sharded else None
        self.folds_into_optimizer = optimizer_applies_grad_scale(optimizer) and not sharded
        self.threshold = build_threshold(config)

    def _grads(self) -> list[Tensor]:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        return [g.to_local() if hasattr(g, "to_local") else g for g in grads] if self.sharded else grads

    def _global_norm(self, grads: list[Tensor]) -> Tensor:
        norm_type = float(self.config.norm_type)
        local = total_norm(grads, norm_type)
        if not self.sharded:
            return local
        import torch.distributed as dist

        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            return local
        powered = local.to(torch.float64) ** norm_type
        dist.all_reduce(powered, op=dist.ReduceOp.SUM)
        return (powered ** (1.0 / norm_type)).to(torch.float32)

    def _flat_intact(self) -> bool:
        return self.flat_grads is not None and self.flat_grads.intact()

    @torch.no_grad()
    def clip(self) -> ClipOutcome:
        config = self.config
        flat = self._flat_intact()  # once per step: falls back to the foreach path if grads were replaced
        if flat:
            norm = self.flat_grads.norm(config.norm_type)
        else:
            norm = self._global_norm(self._grads())
        nonfinite = (~torch.isfinite(norm)).to(torch.float32)
        coefficient = torch.ones_like(norm)
        threshold = torch.full_like(norm, math.nan)
        if self.threshold is not None:
            threshold = self.threshold(norm)
            coefficient = clip_coefficient(norm, threshold)
            if self.folds_into_optimizer:
                self.optimizer.grad_scale = coefficient.reciprocal()  # the kernel divides by it
            elif flat:
                self.flat_grads.scale_(coefficient)
            else:
                _scale_(self._grads(), coefficient)
        elif config.mode == "value":
            if flat:
                self.flat_grads.clamp_(config.max_value)
            else:
                _clamp_(self._grads(), config.max_value)
        if self.folds_into_optimizer:
            self.optimizer.found_inf = nonfinite if config.skip_nonfinite else None
        return ClipOutcome(norm, coefficient, nonfinite, threshold)

    def optimizer_step(self, outcome: ClipOutcome) -> None:
        """Step the optimizer unless the gradient was non-finite (and skipping is on)."""
        if self.folds_into_optimizer or not self.config.skip_nonfinite:
            self.optimizer.step()  # a fused kernel skips on found_inf by itself
            return
        # Optimizers without a found_inf hook (foreach AdamW, bitsandbytes 8-bit) need the host to decide:
        # the one read-back in the step, and only on this path.
        if not bool(outcome.nonfinite):
            self.optimizer.step()

    def zero_grad(self) -> None:
        if self._flat_intact():
            self.flat_grads.zero_()
        else:
            for param in self.parameters:
                param.grad = None

    def state_dict(self) -> dict:
        """The adaptive threshold's statistics, for checkpoints (fixed modes have none)."""
        return {"threshold": self.threshold.state_dict() if self.threshold is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.threshold is not None:
            self.threshold.load_state_dict(state["threshold"])
