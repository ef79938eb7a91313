"""Preference objectives: DPO (and IPO, TRL's other pairwise loss types), ORPO, SimPO, KTO, and reward models.
They differ from SFT only in how a micro-batch is built and how its loss and metrics are computed; the loop, the
clip, accumulation, checkpoints and data parallelism are SFT's (ftclip/train.py).

The formulas are TRL's (trl/trainer/dpo_trainer.py `_compute_loss`, kto_trainer.py, reward_trainer.py,
experimental/orpo and experimental/cpo), so the same batch gives TRL's loss; see docs/preference.md.

- One forward per micro-batch for both answers: the chosen rows, then the rejected rows, right-padded into one
  batch; the log-probability of each answer token comes from the chunked path (ftclip/loss.py
  `token_log_probs`: no [batch, sequence, vocabulary] logits), summed per answer. Prompt tokens never count.
- The reference (dpo, ipo, kto) is the same weights with the LoRA adapter disabled (peft's `disable_adapter`; no
  second copy), or for full fine-tuning a frozen copy made before the first step, or with
  precompute_ref_log_probs the log-probabilities computed once before training from the weights as loaded (eval
  mode), cached beside the tokens and read with each row.
- The step's loss is a mean over its pairs (KTO: its examples; every micro-batch and rank counted), as SFT's is a
  mean over its tokens; metrics (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracy,
  logps/chosen, logps/rejected, ...) are normalized the same way, so the loop sums and rank-averages them as it
  does the loss. Terms TRL averages over tokens (the NLL of sft/rpo_alpha, ORPO and CPO) and KTO's KL estimate
  are taken per micro-batch and weighted by its share of the step's items: with one micro-batch per step (TRL's
  setting in the equivalence tests) exactly TRL's value.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ftclip.data.preference import KTORow, PairRow, PreferenceRows
from ftclip.data.records import IGNORE_INDEX
from ftclip.loss import shifted_targets, token_log_probs
from ftclip.objectives.base import MicroBatchLoss

DEFAULT_BETA = 0.1  # TRL's DPOConfig, KTOConfig and CPOConfig default
DEFAULT_ORPO_ALPHA = 0.1  # TRL's ORPOConfig beta (λ)
DEFAULT_SIMPO_GAMMA = 0.5  # TRL's CPOConfig simpo_gamma


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP's wrapper (FSDP2 shards in place: the module is the model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _padded(sequences: list[np.ndarray], pad: int) -> torch.Tensor:
    length = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), length), pad, dtype=torch.long)
    for index, sequence in enumerate(sequences):
        out[index, :len(sequence)] = torch.from_numpy(sequence)
    return out


def collate_answers(prompts: list[np.ndarray], answers: list[np.ndarray], pad_token_id: int,
                    score_prompt: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Rows prompt + answer, right-padded: input_ids, attention_mask, `answer_labels` (the answer's ids, -100
    elsewhere) and `labels` (the tokens whose log-probability is computed: the answer's, plus the prompt's in the
    rows `score_prompt` marks, for ORPO's NLL over the whole chosen sequence)."""
    sequences = [np.concatenate([prompt, answer]) for prompt, answer in zip(prompts, answers)]
    input_ids = _padded(sequences, pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    answer_labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for index, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        attention_mask[index, :len(sequence)] = 1
        answer_labels[index, len(prompt):len(sequence)] = input_ids[index, len(prompt):len(sequence)]
        start = 0 if score_prompt and score_prompt[index] else len(prompt)
        labels[index, start:len(sequence)] = input_ids[index, start:len(sequence)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "answer_labels": answer_labels}


def answer_log_probs(model, inputs: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row sum of the answer tokens' log-probabilities, per-row answer token count, per-token log-probs of
    every scored token with its row and whether it is an answer token) for collated rows."""
    logps, rows = token_log_probs(model, inputs, chunked=chunked)
    scored = shifted_targets(inputs["labels"]) != IGNORE_INDEX
    is_answer = (shifted_targets(inputs["answer_labels"]) != IGNORE_INDEX)[scored].to(logps.device)
    count = inputs["input_ids"].shape[0]
    sums = torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps * is_answer)
    tokens = (shifted_targets(inputs["answer_labels"]) != IGNORE_INDEX).sum(-1).to(logps.device)
    return sums, tokens, (logps, rows, is_answer)


class Reference:
    """Where the reference log-probabilities come from (dpo, ipo, kto): precomputed (read from the rows), the same
    weights with the adapter disabled (LoRA/QLoRA), or a frozen copy (full fine-tuning)."""

    def __init__(self, recipe):
        self.precomputed = recipe.precompute_ref_log_probs
        self.full_fine_tune = recipe.adapter is None
        self.frozen: torch.nn.Module | None = None

    def keep_a_copy(self, model: torch.nn.Module) -> None:
        """Full fine-tuning without precomputed references: freeze a copy of the weights as loaded (before any
        step or resume), in eval mode."""
        if self.full_fine_tune and not self.precomputed and self.frozen is None:
            self.frozen = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    @contextlib.contextmanager
    def model(self, model: torch.nn.Module):
        if self.frozen is not None:
            yield self.frozen
            return
        inner = _unwrap(model)
        training = inner.training
        inner.eval()  # no dropout in the reference
        try:
            with inner.disable_adapter():
                yield inner
        finally:
            inner.train(training)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the masked values (0 when none is selected, as a sum over nothing)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _share(value: torch.Tensor, weight: float, items: float) -> torch.Tensor:
    """A micro-batch mean, weighted by the micro-batch's share of the step's items."""
    return value * (weight / items)


# ---------------------------------------------------------------- pairs: dpo, ipo, orpo, simpo


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)), as TRL's ORPO computes it (branch at −ln 2 against cancellation)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_pair_losses(loss_type: str, chosen_logratios, rejected_logratios, beta: float, label_smoothing: float,
                    chosen_tokens, rejected_tokens, chosen_logps, rejected_logps) -> torch.Tensor:
    """The per-pair loss of one of TRL's DPO loss types (f_divergence reverse_kl: scores are the log-ratios)."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        # TRL normalizes IPO's log-ratios by the answer lengths (confirmed with the IPO authors, per its comment).
        average = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (average - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, device=delta.device, dtype=delta.dtype)
        return (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
                + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon)))
    if loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
    if loss_type == "sigmoid_norm":
        average = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return -F.logsigmoid(beta * average)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


class PairObjective:
    """dpo, ipo, orpo and simpo: a loss over (chosen, rejected) pairs of one prompt."""

    def __init__(self, recipe):
        self.name = recipe.rl
        self.chunked = recipe.chunked_cross_entropy
        self.beta = recipe.rl_beta or DEFAULT_BETA
        if recipe.rl == "ipo":
            self.loss_types, self.loss_weights = ["ipo"], [1.0]
        else:
            self.loss_types = list(recipe.dpo_loss_type or ["sigmoid"])
            self.loss_weights = list(recipe.dpo_loss_weights or [1.0] * len(self.loss_types))
        if recipe.rpo_alpha:  # RPO: the NLL of the chosen answer with this weight (TRL: loss type "sft")
            self.loss_types.append("sft")
            self.loss_weights.append(recipe.rpo_alpha)
        self.label_smoothing = recipe.dpo_label_smoothing
        self.orpo_alpha = recipe.orpo_alpha or DEFAULT_ORPO_ALPHA
        self.simpo_gamma = DEFAULT_SIMPO_GAMMA if recipe.simpo_gamma is None else recipe.simpo_gamma
        self.cpo_alpha = recipe.cpo_alpha or 0.0
        self.reference = Reference(recipe) if recipe.rl in ("dpo", "ipo") else None

    # -- the loop's contract

    def step_items(self, group: list[list[PairRow]]) -> int:
        return sum(len(batch) for batch in group)

    def batch_tokens(self, batch: list[PairRow]) -> int:
        return sum(2 * len(row.prompt) + len(row.chosen) + len(row.rejected) for row in batch)

    def collate(self, batch: list[PairRow], pad_token_id: int, training: bool = True) -> dict[str, Any]:
        prompts = [row.prompt for row in batch] * 2
        answers = [row.chosen for row in batch] + [row.rejected for row in batch]
        # ORPO's NLL reads the whole chosen sequence, prompt included (TRL's ORPO: labels are every attended token).
        score_prompt = [index < len(batch) for index in range(2 * len(batch))] if self.name == "orpo" else None
        inputs = collate_answers(prompts, answers, pad_token_id, score_prompt)
        if self.reference is not None and batch[0].reference is not None:
            inputs["reference"] = torch.tensor([row.reference for row in batch], dtype=torch.float32)
        return inputs

    def loss(self, model, inputs: dict[str, Any], items: float) -> MicroBatchLoss:
        pairs = inputs["input_ids"].shape[0] // 2
        reference = None
        if self.reference is not None:
            reference = inputs.get("reference")
            if reference is None:  # first, so its activations are gone before the policy's graph is built
                with torch.no_grad(), self.reference.model(model) as reference_model:
                    sums, _, _ = answer_log_probs(reference_model, _answers_only(inputs), self.chunked)
                reference = torch.stack(sums.float().chunk(2), dim=-1)
            reference = reference.to(inputs["input_ids"].device)
        sums, tokens, (token_logps, rows, is_answer) = answer_log_probs(model, inputs, self.chunked)
        sums = sums.float()
        chosen_logps, rejected_logps = sums.chunk(2)
        chosen_tokens, rejected_tokens = tokens.float().chunk(2)
        if self.name == "orpo":
            return self._orpo(chosen_logps / chosen_tokens, rejected_logps / rejected_tokens, token_logps, rows,
                              pairs, items)
        if self.name == "simpo":
            return self._simpo(chosen_logps / chosen_tokens, rejected_logps / rejected_tokens, token_logps, rows,
                               is_answer, pairs, items)
        chosen_logratios = chosen_logps - reference[:, 0]
        rejected_logratios = rejected_logps - reference[:, 1]
        loss = torch.zeros((), device=sums.device)
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            if loss_type == "sft":  # TRL: cross-entropy over the micro-batch's chosen answer tokens
                loss = loss + weight * _share(-_mean(token_logps, (rows < pairs) & is_answer), pairs, items)
                continue
            per_pair = dpo_pair_losses(loss_type, chosen_logratios, rejected_logratios, self.beta,
                                       self.label_smoothing, chosen_tokens, rejected_tokens, chosen_logps,
                                       rejected_logps)
            loss = loss + weight * per_pair.sum() / items
        chosen_rewards, rejected_rewards = self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach()
        return MicroBatchLoss(loss, _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps.detach(),
                                                  rejected_logps.detach(), items))

    def _orpo(self, chosen_logps, rejected_logps, token_logps, rows, pairs: int, items: float) -> MicroBatchLoss:
        # TRL's ORPO: answer log-probs averaged over their tokens; the NLL is the mean over every token of the
        # chosen sequences (prompt included) of the micro-batch.
        log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
        ratio = F.logsigmoid(log_odds)
        nll = -_mean(token_logps, rows < pairs)
        loss = _share(nll, pairs, items) - (self.orpo_alpha * ratio).sum() / items
        metrics = _pair_metrics(self.orpo_alpha * chosen_logps.detach(), self.orpo_alpha * rejected_logps.detach(),
                                chosen_logps.detach(), rejected_logps.detach(), items)
        metrics.update({"nll_loss": _share(nll.detach(), pairs, items),
                        "log_odds_ratio": ratio.detach().sum() / items, "log_odds_chosen": log_odds.detach().sum() / items})
        return MicroBatchLoss(loss, metrics)

    def _simpo(self, chosen_logps, rejected_logps, token_logps, rows, is_answer, pairs: int, items: float
               ) -> MicroBatchLoss:
        # TRL's CPO with loss_type simpo: average log-probs, margin γ/β, plus cpo_alpha × the NLL of the chosen
        # answers (mean over the micro-batch's chosen answer tokens).
        logits = chosen_logps - rejected_logps - self.simpo_gamma / self.beta
        loss = -F.logsigmoid(self.beta * logits).sum() / items
        metrics = _pair_metrics(self.beta * chosen_logps.detach(), self.beta * rejected_logps.detach(),
                                chosen_logps.detach(), rejected_logps.detach(), items)
        if self.cpo_alpha:
            nll = -_mean(token_logps, (rows < pairs) & is_answer)
            loss = loss + self.cpo_alpha * _share(nll, pairs, items)
            metrics["nll_loss"] = _share(nll.detach(), pairs, items)
        return MicroBatchLoss(loss, metrics)

    # -- before the first step

    def prepare(self, model, data, context) -> str | None:
        if self.reference is None:
            return None
        if self.reference.precomputed:
            return precompute_reference(self, model, data, context)
        self.reference.keep_a_copy(model)
        if self.reference.frozen is not None:
            return "reference: a frozen copy of the weights as loaded (precompute_ref_log_probs: true saves its memory)"
        return "reference: the same weights with the LoRA adapter disabled (no second copy)"

    @torch.no_grad()
    def reference_log_probs(self, model, batch: list[PairRow], pad_token_id: int) -> np.ndarray:
        """[len(batch), 2]: the chosen and rejected answers' log-probabilities under `model`."""
        inputs = collate_answers([row.prompt for row in batch] * 2, [row.chosen for row in batch]
                                 + [row.rejected for row in batch], pad_token_id)
        sums, _, _ = answer_log_probs(model, _to(inputs, model), self.chunked)
        return torch.stack(sums.float().chunk(2), dim=-1).cpu().double().numpy()


def _answers_only(inputs: dict[str, Any]) -> dict[str, Any]:
    return {**inputs, "labels": inputs["answer_labels"]}


def _to(inputs: dict[str, Any], model) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, items: float) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_rewards.sum() / items,
        "rewards/rejected": rejected_rewards.sum() / items,
        "rewards/margins": (chosen_rewards - rejected_rewards).sum() / items,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum() / items,
        "logps/chosen": chosen_logps.sum() / items,
        "logps/rejected": rejected_logps.sum() / items,
    }


# ---------------------------------------------------------------- kto


class KTOObjective:
    """KTO (TRL's loss_type kto): each example is a prompt with one completion, desirable or not. The KL term
    z₀ is estimated from mismatched pairs (each prompt with another example's completion, see
    ftclip/data/preference.py): the mean over the micro-batch of log π(y'|x) − log π_ref(y'|x), detached and
    clamped at 0, as TRL computes it per batch (TRL also averages it over ranks; here it is each rank's)."""

    name = "kto"

    def __init__(self, recipe):
        self.chunked = recipe.chunked_cross_entropy
        self.beta = recipe.rl_beta or DEFAULT_BETA
        self.desirable_weight = recipe.kto_desirable_weight
        self.undesirable_weight = recipe.kto_undesirable_weight
        self.reference = Reference(recipe)

    def step_items(self, group: list[list[KTORow]]) -> int:
        return sum(len(batch) for batch in group)

    def batch_tokens(self, batch: list[KTORow]) -> int:
        return sum(2 * len(row.prompt) + len(row.completion) + len(row.mismatched) for row in batch)

    def collate(self, batch: list[KTORow], pad_token_id: int, training: bool = True) -> dict[str, Any]:
        prompts = [row.prompt for row in batch]
        inputs = collate_answers(prompts, [row.completion for row in batch], pad_token_id)
        mismatched = collate_answers(prompts, [row.mismatched for row in batch], pad_token_id)
        inputs.update({f"kl_{name}": value for name, value in mismatched.items()})
        inputs["desirable"] = torch.tensor([row.desirable for row in batch])
        if batch[0].reference is not None:
            inputs["reference"] = torch.tensor([row.reference for row in batch], dtype=torch.float32)
        return inputs

    def loss(self, model, inputs: dict[str, Any], items: float) -> MicroBatchLoss:
        mismatched = {name.removeprefix("kl_"): value for name, value in inputs.items() if name.startswith("kl_")}
        reference = inputs.get("reference")
        if reference is None:
            with torch.no_grad(), self.reference.model(model) as reference_model:
                completion, _, _ = answer_log_probs(reference_model, inputs, self.chunked)
                kl_reference, _, _ = answer_log_probs(reference_model, mismatched, self.chunked)
            reference = torch.stack([completion.float(), kl_reference.float()], dim=-1)
        reference = reference.to(inputs["input_ids"].device)
        with torch.no_grad():
            kl_policy, _, _ = answer_log_probs(model, mismatched, self.chunked)
        kl = (kl_policy.float() - reference[:, 1]).mean().clamp(min=0)
        logps, _, _ = answer_log_probs(model, inputs, self.chunked)
        logratios = logps.float() - reference[:, 0]
        desirable = inputs["desirable"].to(logratios.device)
        losses = torch.where(desirable, self.desirable_weight * (1 - torch.sigmoid(self.beta * (logratios - kl))),
                             self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - logratios))))
        examples = len(desirable)
        rewards = self.beta * logratios.detach()
        metrics = {"kl": _share(kl, examples, items)}
        chosen, rejected = desirable.sum(), (~desirable).sum()
        # Means over this micro-batch's desirable (chosen) and undesirable (rejected) examples, as TRL logs them.
        for name, mask, count in (("chosen", desirable, chosen), ("rejected", ~desirable, rejected)):
            if count:
                metrics[f"rewards/{name}"] = _share(rewards[mask].sum() / count, examples, items)
                metrics[f"logps/{name}"] = _share(logps.detach().float()[mask].sum() / count, examples, items)
            else:
                metrics[f"rewards/{name}"] = metrics[f"logps/{name}"] = torch.zeros((), device=logps.device)
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return MicroBatchLoss(losses.sum() / items, metrics)

    def prepare(self, model, data, context) -> str | None:
        if self.reference.precomputed:
            return precompute_reference(self, model, data, context)
        self.reference.keep_a_copy(model)
        if self.reference.frozen is not None:
            return "reference: a frozen copy of the weights as loaded (precompute_ref_log_probs: true saves its memory)"
        return "reference: the same weights with the LoRA adapter disabled (no second copy)"

    @torch.no_grad()
    def reference_log_probs(self, model, batch: list[KTORow], pad_token_id: int) -> np.ndarray:
        prompts = [row.prompt for row in batch]
        out = []
        for answers in ([row.completion for row in batch], [row.mismatched for row in batch]):
            sums, _, _ = answer_log_probs(model, _to(collate_answers(prompts, answers, pad_token_id), model), self.chunked)
            out.append(sums.float())
        return torch.stack(out, dim=-1).cpu().double().numpy()


# ---------------------------------------------------------------- reward models


class RewardObjective:
    """A reward model (AutoModelForSequenceClassification, one output): the Bradley–Terry loss
    −log σ(r_chosen − r_rejected) per pair, plus center_rewards_coefficient × (r_chosen + r_rejected)², as TRL's
    RewardTrainer. Each sequence is the prompt and answer together (TRL tokenizes prompt + answer as one)."""

    name = "reward"

    def __init__(self, recipe):
        self.center = recipe.center_rewards_coefficient

    def step_items(self, group: list[list[PairRow]]) -> int:
        return sum(len(batch) for batch in group)

    def batch_tokens(self, batch: list[PairRow]) -> int:
        return sum(2 * len(row.prompt) + len(row.chosen) + len(row.rejected) for row in batch)

    def collate(self, batch: list[PairRow], pad_token_id: int, training: bool = True) -> dict[str, Any]:
        inputs = collate_answers([row.prompt for row in batch] * 2, [row.chosen for row in batch]
                                 + [row.rejected for row in batch], pad_token_id)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}

    def loss(self, model, inputs: dict[str, Any], items: float) -> MicroBatchLoss:
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        per_pair = -F.logsigmoid(chosen - rejected)
        if self.center is not None:
            per_pair = per_pair + self.center * (chosen + rejected) ** 2
        chosen, rejected = chosen.detach(), rejected.detach()
        return MicroBatchLoss(per_pair.sum() / items, {
            "rewards/chosen": chosen.sum() / items, "rewards/rejected": rejected.sum() / items,
            "rewards/margins": (chosen - rejected).sum() / items,
            "rewards/accuracy": (chosen > rejected).float().sum() / items,
        })

    def prepare(self, model, data, context) -> str | None:
        return None


# ---------------------------------------------------------------- precomputed reference log-probabilities


def precompute_reference(objective, model, data, context) -> str:
    """Every example's reference log-probabilities, from the weights as loaded (eval mode, before any step or
    resume), cached beside the tokens under a key of the model and the data; attached to the rows. Every rank
    computes all of them (FSDP needs each forward on every rank); rank 0 writes the cache."""
    from ftclip.data.cache import entry_key
    from ftclip.modeling import model_identity

    recipe, dist = context.recipe, context.dist
    train, val = data.train, data.val
    parts = {"model": model_identity(recipe), "data": data.cache.name, "kto": objective.name == "kto",
             "chunked": recipe.chunked_cross_entropy}
    if objective.name == "kto":  # the mismatched partner is the previous example of the same split
        parts["split"] = [recipe.val_set_size, recipe.seed, recipe.dataset_exact_deduplication]
    path = data.cache / f"reference-{entry_key(parts)}.npy"
    try:
        reference = np.load(path)
        hit = reference.shape == (len(data.examples), 2)
    except (OSError, ValueError):
        hit = False
    if not hit:
        reference = np.full((len(data.examples), 2), math.nan)
        inner = _unwrap(model)
        training = inner.training
        inner.eval()
        try:
            for rows in (train, val):
                for start in range(0, len(rows), recipe.micro_batch_size):
                    positions = range(start, min(start + recipe.micro_batch_size, len(rows)))
                    values = objective.reference_log_probs(inner, rows.rows(positions), context.pad_token_id)
                    reference[rows.members[list(positions)]] = values
        finally:
            inner.train(training)
        if dist.is_main:
            from ftclip.data.cache import write_atomically

            try:
                staging = path.with_name(f".{path.name}.tmp.npy")
                np.save(staging, reference)
                write_atomically(path, staging.read_bytes())
                staging.unlink()
            except OSError:
                pass  # only a speed-up: the next run computes them again
    for rows in (train, val):
        rows.reference = reference
    count = len(train) + len(val)
    return (f"reference: log-probabilities of {count:,} {data.examples.unit} "
            + ("read from the cache" if hit else "computed before training and cached") + f" ({path.name})")


__all__ = ["KTOObjective", "PairObjective", "PreferenceRows", "RewardObjective", "precompute_reference"]
