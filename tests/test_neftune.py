"""neftune_noise_alpha: transformers' NEFTune hook on the input embeddings, active in training forwards only."""

from __future__ import annotations

import math

import torch
from rich.console import Console

from ftclip.data import prepare
from ftclip.modeling import load_model, load_tokenizer
from ftclip.objectives import objective_for
from ftclip.recipe import load_recipe
from ftclip.train import evaluate, train


def test_the_noise_changes_training_and_has_transformers_magnitude(make_recipe, tiny_model_dir):
    quiet = Console(quiet=True)
    plain = train(load_recipe(make_recipe(max_steps=2)), quiet)
    noisy = train(load_recipe(make_recipe("noisy.yaml", max_steps=2, neftune_noise_alpha=5.0,
                                          output_dir=str(plain.output_dir.parent / "noisy"))), quiet)
    # The same seed, data and weights: only the noise on the embeddings differs in the first step's loss.
    assert noisy.records[0]["loss"] != plain.records[0]["loss"]

    from transformers.integrations.neftune import activate_neftune

    recipe = load_recipe(make_recipe("probe.yaml"))
    model = load_model(recipe, torch.device("cpu"))
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = embeddings(ids)
    activate_neftune(model, 5.0)
    model.train()
    noise = embeddings(ids) - clean
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[2])  # alpha / sqrt(sequence length x hidden size)
    assert 0 < noise.abs().max() <= bound * (1 + 1e-6)  # uniform in [-bound, bound]; fp32 rounding of the add
    model.eval()
    assert torch.equal(embeddings(ids), clean)


def test_evaluation_sees_no_noise(make_recipe):
    from transformers.integrations.neftune import activate_neftune

    recipe = load_recipe(make_recipe(val_set_size=3))
    tokenizer = load_tokenizer(recipe)
    data = prepare(recipe, tokenizer)
    model = load_model(recipe, torch.device("cpu"), tokenizer)
    objective = objective_for(recipe)

    def eval_loss() -> float:
        return evaluate(model, data.val, objective, 2, tokenizer.pad_token_id, torch.device("cpu"))["eval_loss"]

    before = eval_loss()
    activate_neftune(model, 50.0)
    model.train()  # as during training: evaluate() switches to eval mode, where the hook adds nothing
    assert eval_loss() == before == eval_loss()
