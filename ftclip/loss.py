"""The training loss without the whole sequence's logits.

The plain path (`model(**inputs).loss`) projects every position onto the vocabulary: at Llama 3's 128,256
tokens that is 0.5 GB per 1,024 positions in fp32, and as much again for its gradient. Here the decoder body
runs once for its last hidden states (`logits_to_keep` empty: no logits), positions without a target are
dropped (prompts, padding, the first token of each packed example: they never needed logits), and the
rest go through lm_head + cross-entropy a chunk at a time. When lm_head is a bare Linear (the usual case:
LoRA leaves it frozen, or `modules_to_save` trains a copy), a custom autograd Function computes each chunk's
gradients (softmax − one-hot, times the weight) in the forward while its logits exist and frees them: the
same matmuls as the plain path, nothing recomputed. When lm_head carries a LoRA adapter, or the model
transforms its logits, each chunk runs under `torch.utils.checkpoint` instead: its logits are freed after the
forward and recomputed in the backward (a second lm_head matmul). Peak memory is one chunk's logits and
their gradient either way.

The result is the plain path's, number for number: transformers' causal-LM loss (labels shifted left,
ignore_index -100, fp32 logits) as a token SUM divided by `num_items_in_batch` (ftclip's step-wide
trained-token count), or a token mean when it is None; adapters on lm_head train as they would.

With `liger_fused_linear_cross_entropy` (CUDA, liger-kernel installed) Liger's fused kernel replaces the
chunk loop; it reads lm_head's weight directly, so it is refused when lm_head carries a LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftclip.data.records import IGNORE_INDEX
from ftclip.data.vision import IMAGE_MODEL_INPUTS  # what an image chat batch carries (pixel_values, ...)
from ftclip.errors import ModelError

# Elements of fp32 logits per chunk (2**25 × 4 B = 128 MiB): ~260 tokens at a 128k vocabulary, all of a
# short sequence at a small one.
CHUNK_LOGITS = 2**25
# Keys of a batch that are attention inputs for the decoder body (not loss inputs).
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                 "max_length_k")


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns lm_head: through DDP's `.module` and peft's wrapper (LoRA layers are injected in
    place, so the base model's lm_head is the adapted one)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: the label row shifted left, -100 after the last position."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _logit_transform(config):
    """Final-logit tweaks some architectures apply inside their forward (Cohere's scale, Gemma 2's softcap),
    or None when there are none."""
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale is None and softcap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _plain_linear(lm_head: torch.nn.Module) -> torch.nn.Linear | None:
    """lm_head as a bare Linear whose weight can be read directly (peft's modules_to_save wrapper: the active
    adapter's trained copy), or None when it is more than that (a LoRA layer on it)."""
    copies = getattr(lm_head, "modules_to_save", None)
    if copies is not None:
        active = lm_head.active_adapter
        lm_head = copies[active if isinstance(active, str) else active[0]]
    if type(lm_head) is torch.nn.Linear:
        return lm_head
    return None


def _linear_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out (float32) = hidden @ weightᵀ + bias, without a temporary when the weight is float32 too."""
    if weight.dtype != out.dtype:
        out.copy_(F.linear(hidden, weight, bias))
        return
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weightᵀ + bias, targets) / denominator, with the gradients computed in the forward, a
    chunk at a time, while each chunk's logits exist: no chunk is recomputed in the backward, which only
    scales the stored gradients. Same matmuls as the plain path (logits, grad of hidden, grad of weight
    when it trains)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk_tokens: int, with_grads: bool):
        # Grad mode is off inside forward; with_grads says whether the caller's was on (not under no_grad).
        need_hidden, need_weight, need_bias = (with_grads and need for need in ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        # Two chunk-sized buffers for every chunk: a fresh 128 MiB tensor per chunk costs its page faults each
        # time on the CPU (allocations that large go back to the OS when freed), which measured more than the
        # softmax itself.
        rows_per_chunk = min(chunk_tokens, hidden.shape[0])
        logits_buffer, probs_buffer = (torch.empty(rows_per_chunk, weight.shape[0], dtype=torch.float32,
                                                   device=hidden.device) for _ in range(2))
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            rows = torch.arange(len(chunk_targets), device=hidden.device)
            logits, probs = logits_buffer[:len(rows)], probs_buffer[:len(rows)]
            _linear_into(logits, chunk, weight, bias)
            # One fused softmax pass gives d(sum CE)/d logits (softmax - one-hot); logsumexp, sub and exp
            # would be four passes over the chunk's logits. The loss, log Σ exp - target logit, is read off
            # the most likely token, whose probability is 1 / Σ exp(logit - max) ≥ 1/vocab, so its log never
            # underflows as a far-off target's would: log Σ exp = max logit - log max p. (amax, not argmax:
            # five times faster on the CPU.)
            top_logits = logits.amax(dim=-1)
            target_logits = logits[rows, chunk_targets]
            torch.softmax(logits, dim=-1, out=probs)
            total += (top_logits - torch.log(probs.amax(dim=-1)) - target_logits).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            probs[rows, chunk_targets] -= 1
            grad_logits = probs.div_(denominator)  # scaled before the matmuls, as autograd does on the plain path
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden and grad_hidden.dtype == weight.dtype:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk_tokens])
            elif need_hidden:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), chunk)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / denominator

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * grad_total.to(grad.dtype)  # noqa: E731
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                          num_items_in_batch: float | torch.Tensor | None = None, chunk_tokens: int | None = None,
                          transform=None) -> torch.Tensor:
    """Sum of the token cross-entropies of `lm_head(hidden)` against `targets` (already shifted; -100 is
    ignored), divided by `num_items_in_batch` (or by the targeted token count when None). hidden: [..., H],
    targets: [...]. Only one chunk of `chunk_tokens` rows of logits exists at any time, forward or backward.
    A bare Linear lm_head goes through _LinearCrossEntropy (gradients in the forward); anything else (a LoRA
    layer on lm_head, a logit transform) through per-chunk checkpoints of the module call."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if chunk_tokens is None:
        vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
        chunk_tokens = max(1, CHUNK_LOGITS // vocab)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(keep.numel()), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(hidden.device)
    linear = _plain_linear(lm_head) if transform is None else None
    if linear is not None:
        return _LinearCrossEntropy.apply(hidden, linear.weight, linear.bias, targets, denominator, chunk_tokens,
                                         torch.is_grad_enabled())
    total = _checkpointed_chunks(hidden, targets, lm_head, chunk_tokens, transform or (lambda logits: logits))
    return total / denominator


def _checkpointed_chunks(hidden, targets, lm_head, chunk_tokens: int, transform) -> torch.Tensor:
    def chunk_loss(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = transform(lm_head(chunk_hidden).float())
        return F.cross_entropy(logits, chunk_targets, reduction="sum")

    # Zero from the graph (not a constant) so that a batch without targets still back-propagates.
    total = hidden.sum() * 0.0
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
    return total


def liger_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                        num_items_in_batch: float | torch.Tensor | None = None, softcap: float | None = None
                        ) -> torch.Tensor:
    """The same loss through Liger's fused linear cross-entropy (CUDA): logits are never written out."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    layer = _plain_linear(lm_head)
    if layer is None:
        raise ModelError("liger_fused_linear_cross_entropy: lm_head is not a plain linear layer (a LoRA adapter on it?); "
                         "Liger reads the weight directly. Leave lm_head out of lora_target_modules or turn Liger off")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    total = liger_fused_linear_cross_entropy(hidden.contiguous(), layer.weight, targets, layer.bias,
                                             ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
    if isinstance(total, tuple):  # newer versions return (loss, z_loss)
        total = total[0]
    if num_items_in_batch is None:
        num_items_in_batch = max(int((targets != IGNORE_INDEX).sum()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@dataclass
class LanguageModelLoss:
    """One micro-batch's loss (what backward runs on) and, for an MoE model whose config has
    output_router_logits on, its router auxiliary loss (detached, before router_aux_loss_coef; normalized like
    the loss, so summed over a step's micro-batches it is their token-weighted mean)."""

    loss: torch.Tensor
    router_aux_loss: torch.Tensor | None = None


def loss_function(recipe):
    """`(model, inputs, num_items_in_batch) -> LanguageModelLoss` as the recipe chooses: Liger's kernel, the
    chunked loss (the default), or the plain path."""
    chunked, liger = recipe.chunked_cross_entropy, recipe.liger_fused_linear_cross_entropy

    def compute(model, inputs: dict, num_items_in_batch=None) -> LanguageModelLoss:
        return language_model_loss(model, inputs, num_items_in_batch, chunked=chunked, liger=liger)

    return compute


def decoder_hidden(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module, object]:
    """The decoder body's last hidden states for `inputs` (after the final norm: what lm_head reads), with no
    position projected onto the vocabulary, the module that owns lm_head, and the model's output (an MoE's aux_loss).
    The call goes through the top-level model so that peft, DDP and FSDP2 see an ordinary forward."""
    forward_inputs = {name: inputs[name] for name in _MODEL_INPUTS + IMAGE_MODEL_INPUTS if name in inputs}
    core = _core(model)
    captured = []
    hook = core.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    # An empty index list: the causal-LM forward projects no position onto the vocabulary.
    no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    try:
        output = model(**forward_inputs, use_cache=False, logits_to_keep=no_logits)
    finally:
        hook.remove()
    return captured[-1], core, output


def causal_lm_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch: float | torch.Tensor | None = None,
                   chunked: bool = True, liger: bool = False, chunk_tokens: int | None = None) -> torch.Tensor:
    """The loss of one micro-batch (`inputs` as collated: input_ids, labels and attention inputs), the router's
    auxiliary loss included. chunked=False is the plain path, `model(**inputs).loss`, kept as the reference."""
    return language_model_loss(model, inputs, num_items_in_batch, chunked, liger, chunk_tokens).loss


def _router_aux_coefficient(core: torch.nn.Module) -> float | None:
    """router_aux_loss_coef when the model returns an auxiliary loss (output_router_logits on), else None."""
    config = core.config
    if not getattr(config, "output_router_logits", False):
        return None
    return float(getattr(core, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", 0.0)) or 0.0)


def _with_router_aux(loss: torch.Tensor, output, coefficient: float | None, targets: torch.Tensor,
                     num_items_in_batch) -> LanguageModelLoss:
    """loss + coefficient × the router's auxiliary loss, weighted by this micro-batch's share of the step's
    trained tokens: over the step's micro-batches (and ranks) the added term is coefficient × the token-weighted
    mean of the aux losses, whatever the accumulation (transformers adds the full term per forward instead)."""
    aux = getattr(output, "aux_loss", None)
    if coefficient is None or aux is None:
        return LanguageModelLoss(loss)
    if num_items_in_batch is None:
        share = 1.0
    else:
        share = (targets != IGNORE_INDEX).sum().to(aux.device, torch.float32) / num_items_in_batch
    weighted = aux.float() * share
    return LanguageModelLoss(loss + coefficient * weighted.to(loss.device), weighted.detach())


def language_model_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch: float | torch.Tensor | None = None,
                        chunked: bool = True, liger: bool = False, chunk_tokens: int | None = None
                        ) -> LanguageModelLoss:
    """causal_lm_loss with the router's auxiliary loss kept apart, for logging."""
    core = _core(model)
    coefficient = _router_aux_coefficient(core)
    targets = shifted_targets(inputs["labels"])
    if not (chunked or liger):
        output = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = output.loss
        if coefficient is not None and getattr(output, "aux_loss", None) is not None:
            loss = loss - coefficient * output.aux_loss.to(loss.device)  # transformers added it unweighted
        return _with_router_aux(loss, output, coefficient, targets, num_items_in_batch)
    hidden, core, output = decoder_hidden(model, inputs)
    lm_head = core.get_output_embeddings()
    if liger:
        if getattr(core.config, "logit_scale", None) is not None:
            raise ModelError("liger_fused_linear_cross_entropy: this model scales its logits (logit_scale), which Liger's "
                             "kernel does not; use chunked_cross_entropy")
        loss = liger_cross_entropy(hidden, targets, lm_head, num_items_in_batch,
                                   getattr(core.config, "final_logit_softcapping", None))
    else:
        loss = chunked_cross_entropy(hidden, targets, lm_head, num_items_in_batch, chunk_tokens,
                                     _logit_transform(core.config))
    return _with_router_aux(loss, output, coefficient, targets, num_items_in_batch)


# ---------------------------------------------------------------- per-token log-probabilities (preference training)


class _LinearTokenLogProbs(torch.autograd.Function):
    """log p(target) under softmax(hidden @ weightᵀ + bias), a chunk at a time, for a lm_head that does not train
    (LoRA leaves it frozen): the gradient with respect to each hidden state, (one-hot − softmax) @ weight, is
    computed in the forward while the chunk's logits exist, and the backward only scales it by each token's incoming
    gradient. (A training lm_head would need one weight gradient per token's weighting, unknown until the loss is:
    that case goes through per-chunk checkpoints instead.)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, with_grads: bool):
        need_hidden = with_grads and ctx.needs_input_grad[0]
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        rows_per_chunk = min(chunk_tokens, hidden.shape[0])
        logits_buffer, probs_buffer = (torch.empty(rows_per_chunk, weight.shape[0], dtype=torch.float32,
                                                   device=hidden.device) for _ in range(2))
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            rows = torch.arange(len(chunk_targets), device=hidden.device)
            logits, probs = logits_buffer[:len(rows)], probs_buffer[:len(rows)]
            _linear_into(logits, chunk, weight, bias)
            # log p(target) = target logit − log Σ exp, with log Σ exp read off the most likely token as in
            # _LinearCrossEntropy (its probability is ≥ 1/vocab, so its log never underflows).
            top_logits = logits.amax(dim=-1)
            target_logits = logits[rows, chunk_targets]
            torch.softmax(logits, dim=-1, out=probs)
            logps[start:start + len(rows)] = target_logits - top_logits + torch.log(probs.amax(dim=-1))
            if need_hidden:
                probs.neg_()
                probs[rows, chunk_targets] += 1  # one-hot − softmax: d log p(target) / d logits
                grad_hidden[start:start + len(rows)] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_logps.to(grad_hidden.dtype).unsqueeze(-1), None, None, None, None, None


def chunked_token_log_probs(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                            chunk_tokens: int | None = None, transform=None) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H] (targets [N], none ignored), never holding more than one
    chunk of logits. A frozen bare Linear lm_head computes the hidden gradients in the forward
    (_LinearTokenLogProbs); a training one, a LoRA layer on lm_head or a logit transform goes through per-chunk
    checkpoints (the chunk's logits are recomputed in the backward)."""
    targets = targets.to(hidden.device)
    if chunk_tokens is None:
        vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
        chunk_tokens = max(1, CHUNK_LOGITS // vocab)
    linear = _plain_linear(lm_head) if transform is None else None
    frozen = linear is not None and not linear.weight.requires_grad and (linear.bias is None or not linear.bias.requires_grad)
    if frozen or not torch.is_grad_enabled():
        if linear is not None:
            return _LinearTokenLogProbs.apply(hidden, linear.weight, linear.bias, targets, chunk_tokens,
                                              torch.is_grad_enabled())
    transform = transform or (lambda logits: logits)

    def chunk_log_probs(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = transform(lm_head(chunk_hidden).float())
        return logits.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    if not torch.is_grad_enabled():
        return torch.cat([chunk_log_probs(hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
                          for start in range(0, hidden.shape[0], chunk_tokens)] or [hidden.new_zeros(0).float()])
    parts = [checkpoint(chunk_log_probs, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                        use_reentrant=False) for start in range(0, hidden.shape[0], chunk_tokens)]
    return torch.cat(parts) if parts else hidden.sum(-1)[:0].float()


def token_log_probs(model: torch.nn.Module, inputs: dict, chunked: bool = True, chunk_tokens: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each scored token, its row in the batch): the tokens whose label (shifted: position t predicts
    t+1) is not -100, in row-major order. chunked=False is the plain path (the whole batch's logits), kept as the
    reference."""
    targets = shifted_targets(inputs["labels"])
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    if not chunked:
        forward_inputs = {name: inputs[name] for name in _MODEL_INPUTS if name in inputs}
        logits = model(**forward_inputs, use_cache=False).logits.float()
        selected = logits[keep]
        return selected.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1) - selected.logsumexp(-1), rows
    hidden, core, _ = decoder_hidden(model, inputs)
    flat = keep.reshape(-1).nonzero().squeeze(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    logps = chunked_token_log_probs(hidden, targets.reshape(-1).to(hidden.device).index_select(0, flat),
                                    core.get_output_embeddings(), chunk_tokens, _logit_transform(core.config))
    return logps, rows.to(logps.device)
