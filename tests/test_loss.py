"""Chunked cross-entropy against the plain path (`model(**inputs).loss`): the same loss and the same gradients,
with ignored labels, accumulation over micro-batches and ftclip's step-wide token normalization; through peft
with LoRA on lm_head or lm_head/embed_tokens trained in full; and never the whole sequence's logits saved."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_rounding, llama_sums, reordering_rtol

from ftclip.loss import causal_lm_loss, chunked_cross_entropy, shifted_targets

VOCAB = 97


def tiny_llama(vocab_size: int = VOCAB, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides)
    config.use_cache = False  # as load_model sets it: with a cache, transformers ignores packed position_ids
    return LlamaForCausalLM(config).float()


def batch(seed: int, rows: int = 3, length: int = 19) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[0, 12:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 12:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def trained(inputs: dict) -> int:
    return int((inputs["labels"][:, 1:] != -100).sum())


def losses_and_grads(model, micro_batches: list[dict], chunked: bool, chunk_tokens: int | None = 4):
    """Accumulate over the micro-batches as forward_backward does: each loss is a sum over tokens divided by
    the whole step's trained-token count."""
    model.zero_grad()
    items = sum(trained(inputs) for inputs in micro_batches)
    losses = []
    for inputs in micro_batches:
        loss = causal_lm_loss(model, inputs, items, chunked=chunked, chunk_tokens=chunk_tokens)
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads


def assert_same(model, micro_batches):
    plain_losses, plain_grads = losses_and_grads(model, micro_batches, chunked=False)
    chunked_losses, chunked_grads = losses_and_grads(model, micro_batches, chunked=True)
    # The chunks sum the same terms in other orders (other matmul shapes, a loss summed chunk by chunk), and the
    # model's backward carries the difference on: float32 rounding of the whole step (tests/tolerances.py).
    config = model.config
    sums = dict(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                positions=max(inputs["input_ids"].shape[1] for inputs in micro_batches), vocab=config.vocab_size,
                tokens=sum(trained(inputs) for inputs in micro_batches))
    torch.testing.assert_close(chunked_losses, plain_losses, rtol=reordering_rtol(llama_sums(**sums)), atol=0)
    assert chunked_grads.keys() == plain_grads.keys()
    grads_rtol = reordering_rtol(llama_sums(**sums, backward=True))
    for name in plain_grads:
        assert_close_to_rounding(chunked_grads[name], plain_grads[name], grads_rtol, msg=name)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())


@pytest.mark.parametrize("path", ["fused", "checkpointed"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_cross_entropy_equals_the_full_logits_loss_and_gradients(chunk_tokens, path):
    torch.manual_seed(1)
    hidden = torch.randn(2, 11, 16, requires_grad=True)
    linear = torch.nn.Linear(16, VOCAB, bias=True)
    # A bare Linear takes the gradients-in-forward Function; any other module the per-chunk checkpoints.
    head = linear if path == "fused" else torch.nn.Sequential(linear)
    labels = torch.randint(0, VOCAB, (2, 11))
    labels[0, :4] = -100
    targets = shifted_targets(labels)
    reference = F.cross_entropy(head(hidden).float().reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / 7.0
    reference_grads = torch.autograd.grad(reference, [hidden, linear.weight, linear.bias])
    loss = chunked_cross_entropy(hidden, targets, head, num_items_in_batch=7.0, chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad(loss, [hidden, linear.weight, linear.bias])
    # Float32 sums in other orders (tests/tolerances.py): the head's inner products (16), the log-sum-exp over the
    # vocabulary, the 22 positions' losses; backward, the vocabulary again (into hidden) and the positions (into W).
    loss_rtol, grads_rtol = reordering_rtol(16, VOCAB, 22), reordering_rtol(16, VOCAB, 22, VOCAB, 22)
    torch.testing.assert_close(loss, reference, rtol=loss_rtol, atol=0)
    for ours, theirs in zip(grads, reference_grads):
        assert_close_to_rounding(ours, theirs, grads_rtol)
    # Without a count: the mean over targeted tokens, as transformers' loss without num_items_in_batch.
    mean = F.cross_entropy(head(hidden).reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(chunked_cross_entropy(hidden, targets, head, chunk_tokens=chunk_tokens), mean,
                               rtol=loss_rtol, atol=0)
    with torch.no_grad():  # evaluation: the same number, no graph
        evaluated = chunked_cross_entropy(hidden, targets, head, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(evaluated, mean, rtol=loss_rtol, atol=0)
    assert evaluated.grad_fn is None


def test_far_off_targets_keep_their_exact_loss():
    # Logits hundreds apart: the target's softmax probability underflows float32 to 0, so log(softmax) would
    # give inf; the loss is read off the most likely token instead and must equal the plain path's.
    torch.manual_seed(2)
    hidden = (torch.randn(9, 16) * 300).requires_grad_()
    head = torch.nn.Linear(16, VOCAB, bias=False)
    targets = torch.randint(0, VOCAB, (9,))
    reference = F.cross_entropy(head(hidden), targets, reduction="sum") / torch.tensor(9.0)
    assert torch.softmax(head(hidden), -1).gather(1, targets[:, None]).min() == 0  # the case this is about
    loss = chunked_cross_entropy(hidden, targets, head, num_items_in_batch=torch.tensor(9.0), chunk_tokens=4)
    # Float32 sums in other orders: the head (16), the log-sum-exp over the vocabulary, the 9 tokens; backward,
    # the vocabulary again (tests/tolerances.py).
    torch.testing.assert_close(loss, reference, rtol=reordering_rtol(16, VOCAB, 9), atol=0)
    assert_close_to_rounding(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(reference, hidden)[0],
                             reordering_rtol(16, VOCAB, 9, VOCAB))


def test_full_fine_tuning_with_accumulation_matches_the_plain_path():
    model = tiny_llama()
    assert_same(model, [batch(1), batch(2)])


def test_tied_embeddings_and_packed_position_ids_match_the_plain_path():
    model = tiny_llama(tie_word_embeddings=True)
    inputs = batch(3, rows=1, length=24)
    del inputs["attention_mask"]
    inputs["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    inputs["labels"][0, 10] = -100  # the second example's first token
    assert_same(model, [inputs])


@pytest.mark.parametrize("lora", [
    dict(target_modules="all-linear"),  # peft's all-linear leaves lm_head out
    dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
], ids=["all-linear", "lora-on-lm_head", "modules_to_save"])
def test_through_peft_the_loss_and_adapter_gradients_match(lora):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **lora))
    # LoRA B starts at zero, which would make every A gradient zero and the comparison weak.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    assert_same(model, [batch(4), batch(5)])


def test_a_batch_without_targets_gives_zero_loss_and_zero_gradients():
    model = tiny_llama()
    inputs = batch(6)
    inputs["labels"][:] = -100
    loss = causal_lm_loss(model, inputs, 5, chunked=True)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_the_whole_sequence_logits_are_never_saved_for_backward():
    """The plain path keeps [tokens × vocab] logits alive until backward; the chunked one keeps at most one
    chunk's worth (its checkpoint frees the rest). A vocabulary large enough that logits dwarf activations."""
    vocab = 4096
    model = tiny_llama(vocab_size=vocab)
    inputs = batch(7, rows=2, length=64)
    tokens = inputs["input_ids"].numel()

    def largest_saved(chunked: bool) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            causal_lm_loss(model, inputs, 10, chunked=chunked, chunk_tokens=8)
        return max(sizes)

    assert largest_saved(chunked=False) >= tokens * vocab
    assert largest_saved(chunked=True) < tokens * vocab / 2  # the largest is lm_head.weight itself (vocab × 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_loss_matches_and_peak_memory_drops():
    model = tiny_llama(vocab_size=32_000).cuda()
    inputs = {k: v.cuda() for k, v in batch(8, rows=4, length=512).items()}
    assert_same(model, [inputs])
    peaks = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        causal_lm_loss(model, inputs, 100, chunked=chunked).backward()
        peaks[chunked] = torch.cuda.max_memory_allocated()
    assert peaks[True] < peaks[False] / 2


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None,
                    reason="Liger runs here")
def test_validate_refuses_liger_without_the_package_or_cuda(make_recipe):
    import json

    from typer.testing import CliRunner

    from ftclip.cli import app

    recipe = make_recipe(liger_fused_linear_cross_entropy=True, device="cpu")
    result = CliRunner().invoke(app, ["validate", "--json", str(recipe)])
    assert result.exit_code == 2
    problems = json.loads(result.output)[0]["problems"]
    assert any(p["key"] == "liger_fused_linear_cross_entropy" and p["line"] for p in problems)
    assert "Traceback" not in result.output
    # device: auto may be meant for a GPU box: validate warns (CI runs it on CPU runners), train refuses.
    if importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available():
        gpu_recipe = make_recipe("gpu.yaml", liger_fused_linear_cross_entropy=True)
        warned = CliRunner().invoke(app, ["validate", "--json", str(gpu_recipe)])
        assert warned.exit_code == 0, warned.output
        assert any(w.startswith("liger_fused_linear_cross_entropy") and "will refuse it here" in w
                   for w in json.loads(warned.output)[0]["warnings"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs CUDA and liger-kernel")
def test_liger_matches_the_plain_path_on_cuda():
    model = tiny_llama(vocab_size=32_000).cuda()
    inputs = {k: v.cuda() for k, v in batch(9, rows=2, length=128).items()}
    plain = causal_lm_loss(model, inputs, 50, chunked=False)
    fused = causal_lm_loss(model, inputs, 50, chunked=False, liger=True)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- per-token log-probabilities (preference training)


@pytest.mark.parametrize("path", ["frozen-linear", "training-linear", "module", "transform"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_token_log_probs_equal_log_softmax_and_its_gradients(chunk_tokens, path):
    from ftclip.loss import chunked_token_log_probs

    torch.manual_seed(3)
    hidden = torch.randn(13, 16, requires_grad=True)
    linear = torch.nn.Linear(16, VOCAB, bias=True)
    if path == "frozen-linear":  # LoRA's case: gradients for the hidden states only, computed in the forward
        linear.requires_grad_(False)
    head = torch.nn.Sequential(linear) if path == "module" else linear
    transform = (lambda logits: torch.tanh(logits / 3) * 3) if path == "transform" else None
    targets = torch.randint(0, VOCAB, (13,))
    logits = head(hidden).float()
    logits = transform(logits) if transform else logits
    reference = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    # A different weight per token, as the DPO loss gives each answer's tokens its own.
    weights = torch.randn(13)
    trained = [hidden] + [p for p in linear.parameters() if p.requires_grad]
    reference_grads = torch.autograd.grad((reference * weights).sum(), trained)
    ours = chunked_token_log_probs(hidden, targets, head, chunk_tokens=chunk_tokens, transform=transform)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(torch.autograd.grad((ours * weights).sum(), trained), reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        evaluated = chunked_token_log_probs(hidden, targets, head, chunk_tokens=chunk_tokens, transform=transform)
    torch.testing.assert_close(evaluated, reference.detach(), rtol=1e-5, atol=1e-6)
    assert evaluated.grad_fn is None


def test_token_log_probs_through_the_model_match_the_plain_path():
    from peft import LoraConfig, get_peft_model

    from ftclip.loss import token_log_probs

    for model in (tiny_llama(tie_word_embeddings=True),
                  get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
        inputs = batch(8)
        weights = torch.randn(trained(inputs))
        results = []
        for chunked in (False, True):
            model.zero_grad()
            logps, rows = token_log_probs(model, inputs, chunked=chunked, chunk_tokens=5)
            (logps * weights).sum().backward()
            results.append((logps.detach(), rows, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (plain, plain_rows, plain_grads), (chunked, chunked_rows, chunked_grads) = results
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(chunked_rows, plain_rows) and chunked_rows.tolist() == sorted(chunked_rows.tolist())
        for name in plain_grads:
            torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_token_log_probs_never_save_the_whole_sequence_logits():
    from ftclip.loss import token_log_probs

    vocab = 4096
    model = tiny_llama(vocab_size=vocab)
    inputs = batch(9, rows=2, length=64)
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_log_probs(model, inputs, chunked=True, chunk_tokens=8)
    assert max(sizes) < inputs["input_ids"].numel() * vocab / 2
