"""Tolerances for float32 results computed two ways (another summation order, another kernel, another process
layout, another CPU's vector width or fused multiply-adds), derived from float32 arithmetic rather than read off
the last digits one machine produced.

The fact used (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. 2002, §3.1 and §4.2): a float32
sum of n terms, in any order or grouping, with or without fused multiply-adds, is within (n - 1)·u·Σ|terms| of
the exact sum, u = 2^-24. A value that passes through several sums in sequence (an inner product over the hidden
width, a softmax over the positions, a sum over the tokens) is, to first order, within (n1 + n2 + ...)·u of exact
relative to the size of its terms, and two computations of it that differ only in order are within twice that of
each other.

The size of the terms: for sums of non-negative terms (a loss summed over tokens, a squared norm) it is the value
itself, so the bound is a relative tolerance. Values that can cancel (logits, gradients, weight updates) are
compared per tensor with an absolute tolerance scaled by the tensor's largest magnitude (or a bound on it): the
terms are taken to be no larger than that. The models here meet this with room to spare (their measured
differences are hundreds of times below these bounds); it is stated here rather than hidden in a constant.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32, round to nearest


def reordering_rtol(*sum_lengths: int) -> float:
    """Relative tolerance between two float32 computations of one value that differ only in how they order (group,
    vectorize, fuse) the sums it passes through in sequence, of the given lengths."""
    return 2 * sum(sum_lengths) * UNIT_ROUNDOFF


def llama_sums(hidden: int, intermediate: int, layers: int, positions: int, vocab: int = 0, tokens: int = 0,
               backward: bool = False, lora_rank: int = 0) -> int:
    """The total length of the float32 sums one value passes through in sequence in a Llama:
    - a logit (the defaults): per layer the RMSNorm (hidden), q/k/v (hidden), the attention scores (head_dim, at
      most hidden), the softmax's normalizer and its weighted sum of values (positions each), o_proj (hidden), the
      second RMSNorm (hidden), gate/up (hidden) and down (intermediate); then the final norm and lm_head (hidden);
      LoRA (`lora_rank`) adds its rank's terms to each of the four projections a value passes through per layer;
    - a loss summed over `tokens`: besides, the log-sum-exp over the `vocab`, and the sum over the tokens;
    - a weight's gradient (backward=True): the backward pass retraces the forward's sums, from lm_head's over the
      vocabulary, and a weight's gradient sums over the tokens."""
    forward = layers * (6 * hidden + 2 * positions + intermediate + 4 * lora_rank) + 2 * hidden
    total = forward + vocab + tokens
    if backward:
        total += forward + vocab
    return total


# The suite's tiny Llama (conftest.tiny_model_dir) at conftest.write_recipe's sequence_len 128 and lora_r 8.
TINY = dict(hidden=64, intermediate=128, layers=2, positions=128)
TINY_VOCAB = 1024
TINY_LORA_RANK = 8


def tiny_step_sums(examples: int) -> int:
    """One optimizer step's gradient over a global batch of at most `examples` examples."""
    return llama_sums(**TINY, vocab=TINY_VOCAB, tokens=examples * TINY["positions"], backward=True,
                      lora_rank=TINY_LORA_RANK)


def tiny_loss_sums(examples: int) -> int:
    """The loss summed over a global batch of at most `examples` examples."""
    return llama_sums(**TINY, vocab=TINY_VOCAB, tokens=examples * TINY["positions"], lora_rank=TINY_LORA_RANK)


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, rtol: float, magnitude: float | None = None,
                             msg: str | None = None) -> None:
    """Equal to within `rtol` of the terms' size (`magnitude`, by default the largest |expected|), plus one rounding
    of the stored value itself."""
    expected = expected.to(actual.dtype)
    size = float(expected.abs().max()) if magnitude is None else magnitude
    torch.testing.assert_close(actual, expected, rtol=2 * UNIT_ROUNDOFF, atol=rtol * size, msg=msg)


def assert_same_first_lora_sgd_step(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rtol: float) -> None:
    """Two adapters after one plain SGD step from the same LoRA initialization, computed in other layouts. Adam would
    not do here: its first step moves each value by lr·g/(|g| + eps), which normalizes the clip's scale away and
    turns a rounding difference in a gradient value near eps into a difference of up to 2·lr in the weight; SGD's
    lr·coef·g shows the clip, and keeps rounding differences proportional to the gradient."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        if "lora_A" in name:  # lora_B starts at zero, so lora_A's first gradient is exactly zero in any layout
            assert torch.equal(ours[name], theirs[name]), name
        else:  # lora_B starts at zero: its values are the step's update
            assert theirs[name].abs().max() > 0, name
            assert_close_to_rounding(ours[name], theirs[name], rtol, msg=name)
