"""The clip engine against torch: same norms, same clipped gradients, same parameters after a clipped
optimizer step, and untouched weights and optimizer state when a gradient is non-finite."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tolerances import UNIT_ROUNDOFF, reordering_rtol

from ftclip.clip import (
    FlatGrads,
    GradientClipper,
    clip_grad_norm_,
    clip_grad_value_,
    optimizer_applies_grad_scale,
    total_norm,
)
from ftclip.recipe import GradientClipping

SHAPES = [(7, 5), (64,), (3, 4, 5), (1,), (300, 17)]
# make_params' gradients are multiples of 1/8 (|k/8| ≤ ~5 at scale 1): their squares, and sums of squares per
# tensor or per buffer row, are exact in float32 in any order and vector width. Two norms of them then differ
# only by the rounding of the partial norms' square roots and their float32 combination (tests/tolerances.py):
# at most one partial norm per tensor, plus the two square roots.
NORM_RTOL = reordering_rtol(2 * len(SHAPES) + 2)


def make_params(dtypes=(torch.float32,), scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for index, shape in enumerate(SHAPES * 2):
        dtype = dtypes[index % len(dtypes)]
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        param.grad = ((torch.randn(shape, generator=generator) * scale * 8).round() / 8).to(dtype)
        params.append(param)
    return params


def grads_of(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_fp32_matches_torch(norm_type, max_norm):
    ours, theirs = make_params(), make_params()
    norm = clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=NORM_RTOL, atol=0)
    for a, b in zip(ours, theirs):  # scaled by coefficients as close as the norms, one rounding each
        torch.testing.assert_close(a.grad, b.grad, rtol=NORM_RTOL + 4 * UNIT_ROUNDOFF, atol=0)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_half_and_mixed_match_torch_within_bf16_tolerance(dtypes, norm_type):
    ours, theirs = make_params(dtypes), make_params(dtypes)
    norm = clip_grad_norm_(ours, 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    # Ours is float32 even for half grads; the exact value (float64) is the reference for both.
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in make_params(dtypes)]), norm_type)
    assert norm.dtype == torch.float32
    assert abs(norm.item() - exact.item()) / exact.item() < NORM_RTOL
    # torch returns a half-precision norm, itself up to half a bf16 ulp (2^-9) from the truth.
    torch.testing.assert_close(norm, expected.float(), rtol=2**-8, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2e-2, atol=1e-3)


def test_fp16_norm_beyond_fp16_range_is_finite_and_clips():
    params = make_params((torch.float16,), scale=3000.0)  # global norm ~ 2e5 > 65,504
    norm = clip_grad_norm_(params, 1.0)
    assert torch.isfinite(norm) and norm.item() > 65504
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in params]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-2)
    assert all(p.grad.abs().sum() > 0 for p in params)  # torch's fp16 path would have zeroed them


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_nonfinite_grads_match_torch(bad, norm_type):
    ours, theirs = make_params(), make_params()
    ours[2].grad[0, 0, 0] = bad
    theirs[2].grad[0, 0, 0] = bad
    norm = clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert (math.isnan(norm.item()) and math.isnan(expected.item())) or norm.item() == expected.item()
    fresh = make_params()
    fresh[2].grad[0, 0, 0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(fresh, 1.0, norm_type, error_if_nonfinite=True)


def test_empty_and_gradless_parameters():
    assert clip_grad_norm_([], 1.0).item() == 0.0
    param = torch.nn.Parameter(torch.ones(3))
    assert clip_grad_norm_([param], 1.0).item() == 0.0
    assert clip_grad_norm_(param, 1.0).item() == 0.0  # a single tensor, as torch accepts
    assert total_norm([]).item() == 0.0


def test_clip_grad_value_matches_torch():
    ours, theirs = make_params(scale=3.0), make_params(scale=3.0)
    clip_grad_value_(ours, 0.7)
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


# ---------------------------------------------------------------- flat buffers


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_flat_norm_matches_torch(dtypes, norm_type):
    reference = make_params(dtypes)
    params = make_params(dtypes)
    grads = grads_of(params)
    flat = FlatGrads(params)
    for param, grad in zip(params, grads):
        param.grad.copy_(grad)
    # fp32: torch's own norm is the reference; half types: the exact float64 norm (torch's is bf16-rounded).
    if dtypes == (torch.float32,):
        expected = torch.nn.utils.get_total_norm([p.grad for p in reference], norm_type)
        torch.testing.assert_close(flat.norm(norm_type), expected, rtol=NORM_RTOL, atol=0)
    else:
        exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in reference]), norm_type)
        torch.testing.assert_close(flat.norm(norm_type).double(), exact, rtol=NORM_RTOL, atol=0)


def test_flat_norm_is_exact_over_many_values():
    # One flat fp32 reduction over millions of values drifts; the per-row partials must not. With multiples of 1/8
    # up to 63/8, a row's sum of squares (at most 4096 × 63² / 64 < 2^24 / 64) is exact in float32 in any order,
    # while one flat sum's partials pass 2^24 units and round. What is left: each row norm's square root (one float32
    # rounding), their sum in float64 (exact here to 1e-13), and the cast of the result to float32 (one more).
    param = torch.nn.Parameter(torch.zeros(3_000_001))
    flat = FlatGrads([param])
    values = torch.randn(3_000_001, generator=torch.Generator().manual_seed(1)).mul(8).round().clamp(-63, 63) / 8
    param.grad.copy_(values)
    exact = param.grad.double().square().sum().sqrt().item()
    assert abs(flat.norm().item() - exact) / exact <= 2 * UNIT_ROUNDOFF + 1e-12


def test_flat_grads_are_views_that_survive_backward_zero_and_accumulation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    flat = FlatGrads(model.parameters())
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    inputs = [torch.randn(5, 8) for _ in range(3)]
    for step in range(2):
        for x in inputs:  # gradient accumulation over three micro-batches
            model(x).square().sum().backward()
            reference(x).square().sum().backward()
        assert [p.grad.data_ptr() for p in model.parameters()] == pointers
        assert flat.intact()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad)
        buffer_sum = flat.buffers[0].double().sum().item()
        assert buffer_sum == pytest.approx(sum(p.grad.double().sum().item() for p in model.parameters()))
        flat.zero_()
        reference.zero_grad()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_flat_grads_group_by_dtype_and_skip_frozen():
    a = torch.nn.Parameter(torch.zeros(10))
    b = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.zeros(10), requires_grad=False)
    flat = FlatGrads([a, b, frozen])
    assert len(flat.buffers) == 2 and frozen.grad is None
    assert {buffer.dtype for buffer in flat.buffers} == {torch.float32, torch.bfloat16}


# ---------------------------------------------------------------- the training-loop clipper


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    batches = [(torch.randn(4, 6) * 5, torch.randn(4, 3)) for _ in range(8)]
    return model, batches


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y, reduction="sum")


OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, fused=True),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
}


def _train_with_clipper(optimizer_name, config, accumulation=2, poison_step=None):
    model, batches = _model_and_batches()
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    clipper = GradientClipper(config, model.parameters(), optimizer)
    outcomes = []
    for step in range(len(batches) // accumulation):
        for batch in batches[step * accumulation : (step + 1) * accumulation]:
            _loss(model, batch).backward()
        if step == poison_step:
            next(model.parameters()).grad[0, 0] = float("nan")
        outcome = clipper.clip()
        clipper.optimizer_step(outcome)
        clipper.zero_grad()
        outcomes.append(outcome)
    return model, optimizer, outcomes, clipper


def _train_reference(optimizer_name, config, accumulation=2):
    """Unfused reference: torch's clip, then an ordinary optimizer step."""
    model, batches = _model_and_batches()
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    norms = []
    for step in range(len(batches) // accumulation):
        for batch in batches[step * accumulation : (step + 1) * accumulation]:
            _loss(model, batch).backward()
        if config.mode == "norm":
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_norm, config.norm_type))
        else:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], config.norm_type))
            if config.mode == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), config.max_value)
        optimizer.step()
        optimizer.zero_grad()
    return model, norms


CONFIGS = [
    GradientClipping(mode="norm", max_norm=1.0),
    GradientClipping(mode="norm", max_norm=0.05, norm_type=math.inf),
    GradientClipping(mode="value", max_value=0.5),
    GradientClipping(mode="off"),
]


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-{c.norm_type}")
def test_clipped_step_matches_clip_then_step(optimizer_name, config):
    model, _, outcomes, clipper = _train_with_clipper(optimizer_name, config)
    reference, norms = _train_reference(optimizer_name, config)
    assert clipper.folds_into_optimizer == optimizer_name.endswith("fused")
    if config.mode == "norm":
        assert any(o.clip_coef.item() < 1 for o in outcomes), "the test must actually clip"
    # The same gradients' squares summed in other orders: the flat buffer's row against torch's per-tensor norms.
    norm_rtol = reordering_rtol(sum(p.numel() for p in model.parameters()))
    for outcome, norm in zip(outcomes, norms):
        torch.testing.assert_close(outcome.pre_clip_norm, norm.float(), rtol=norm_rtol, atol=0)
    # The coefficients then differ by norm_rtol at most (the fused kernel divides by 1/coef where the reference
    # multiplies by coef: an ulp more), and so, relatively, does each clipped gradient. To first order that moves a
    # weight by at most that fraction of each step: at most lr = 1e-2 for Adam (normalized), and for SGD lr = 1e-3
    # times a momentum buffer of at most 4 clipped gradients (values ≤ max_norm = 1): over the 4 steps, ≤ 4e-2 ×.
    coefficient_rtol = norm_rtol + 2 * UNIT_ROUNDOFF
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=2 * UNIT_ROUNDOFF, atol=4 * 1e-2 * coefficient_rtol)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[3]], ids=lambda c: c.mode)
def test_nonfinite_gradient_leaves_weights_and_state_bit_identical(optimizer_name, config):
    # Stop right after the poisoned step and compare with the state one step earlier.
    model, batches = _model_and_batches()
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    clipper = GradientClipper(config, model.parameters(), optimizer)
    for step in range(3):
        for batch in batches[step * 2 : step * 2 + 2]:
            _loss(model, batch).backward()
        if step == 2:
            weights = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(optimizer.state_dict())
            next(model.parameters()).grad[0, 0] = float("nan")
        outcome = clipper.clip()
        clipper.optimizer_step(outcome)
        clipper.zero_grad()
    assert outcome.nonfinite.item() == 1.0
    for before, after in zip(weights, model.parameters()):
        assert torch.equal(before, after)
    after_state = optimizer.state_dict()["state"]
    for index, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after_state[index][name])), name


def test_training_continues_normally_after_a_skipped_step():
    model, optimizer, outcomes, _ = _train_with_clipper("adamw_fused", CONFIGS[0], poison_step=1)
    assert [o.nonfinite.item() for o in outcomes] == [0.0, 1.0, 0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert next(iter(optimizer.state.values()))["step"].item() == 3.0  # the skipped step is not counted


def test_skip_disabled_applies_the_nonfinite_step_like_torch():
    config = GradientClipping(mode="norm", skip_nonfinite=False)
    model, _, _, _ = _train_with_clipper("adamw_fused", config, poison_step=1)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_falls_back_to_foreach_when_grads_are_replaced():
    model, batches = _model_and_batches()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = GradientClipper(CONFIGS[0], model.parameters(), optimizer)
    optimizer.zero_grad(set_to_none=True)  # a user's habit that drops the flat views
    _loss(model, batches[0]).backward()
    assert not clipper.flat_grads.intact()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    outcome = clipper.clip()
    norm_rtol = reordering_rtol(sum(p.numel() for p in model.parameters()))  # the same squares, maybe reordered
    torch.testing.assert_close(outcome.pre_clip_norm, expected, rtol=norm_rtol, atol=0)
    clipper.optimizer_step(outcome)
    clipper.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_only_fused_torch_optimizers_take_the_scale():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_applies_grad_scale(torch.optim.AdamW(params, fused=True))
    assert optimizer_applies_grad_scale(torch.optim.SGD(params, lr=0.1, fused=True))
    assert not optimizer_applies_grad_scale(torch.optim.AdamW(params, foreach=True))
    assert not optimizer_applies_grad_scale(torch.optim.RMSprop(params))
    assert not optimizer_applies_grad_scale(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; on the CPU the step's design is reviewed instead")
def test_no_host_sync_in_the_clip_step_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    clipper = GradientClipper(CONFIGS[0], model.parameters(), optimizer)
    model(torch.randn(8, 64, device="cuda")).square().sum().backward()
    clipper.clip()  # warm-up: lazy state creation may sync once
    clipper.optimizer_step(clipper.clip())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(torch.randn(8, 64, device="cuda")).square().sum().backward()
        outcome = clipper.clip()
        clipper.optimizer_step(outcome)
        clipper.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
