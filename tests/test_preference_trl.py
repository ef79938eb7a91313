"""Equivalence with TRL (a test-only dependency): the same tiny model and preference data give TRL's tokenization,
and the first optimizer step of dpo, ipo, orpo, simpo, kto and a reward model gives TRL's trainer's loss and
pre-clip gradient norm (full fine-tuning, one batch holding every pair, no clipping, fp32).

Why 1e-4 relative holds: both sides compute the same functions in float32 and differ only in the order of
reductions (ftclip's log-probabilities come from chunked lm_head matmuls and a max-shifted softmax, summed per
answer with index_add; TRL's from full logits, log_softmax and masked sums). Each such reordering moves a float32
result by a few units in the last place (~1e-7 relative), and the step sums at most a few hundred of them through a
two- or three-layer model: about 1e-6 relative, which is what the runs measure (1e-8 to 5e-6). 1e-4 leaves a
factor ~20 of margin while any real difference (a token counted or not, a mean instead of a sum, a missing 1/β)
moves the numbers by far more than 1e-4.

Two model configurations are used (a tied 2-layer and an untied 3-layer Llama of other widths), so nothing is tuned
to one model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from rich.console import Console  # noqa: E402

from ftclip.recipe import Recipe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "recipes" / "quickstart" / "tiny-llama"
RELATIVE = 1e-4

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": " The capital of France is Paris.",
     "rejected": " The capital of France is Rome."},
    {"prompt": "Give the opposite of hot.", "chosen": " cold", "rejected": " warm and sunny"},
    {"prompt": "Count from 3 to 6.", "chosen": " 3, 4, 5, 6", "rejected": " 3, 5, 6"},
    {"prompt": "Write the plural of mouse.", "chosen": " mice", "rejected": " mouses"},
]
CONVERSATIONS = [
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Peru?"}],
     "chosen": [{"role": "assistant", "content": "Lima."}], "rejected": [{"role": "assistant", "content": "Cusco."}]},
    {"prompt": [{"role": "user", "content": "Opposite of big?"}, {"role": "assistant", "content": "small"},
                {"role": "user", "content": "And of fast?"}],
     "chosen": [{"role": "assistant", "content": "slow"}], "rejected": [{"role": "assistant", "content": "quick"}]},
]
KTO = [
    {"prompt": "What is the capital of France?", "completion": " Paris.", "label": True},
    {"prompt": "Give the opposite of hot.", "completion": " warm", "label": False},
    {"prompt": "Count from 3 to 6.", "completion": " 3, 4, 5, 6", "label": True},
    {"prompt": "Write the plural of mouse.", "completion": " mouses", "label": False},
    {"prompt": "Translate red into French.", "completion": " rouge", "label": True},
]

CONFIGS = {
    "tied-2-layer": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "untied-3-layer": dict(hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=3, tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5),
}


def _model_folder(root: Path, name: str, head: str = "causal") -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    folder = root / f"{name}-{head}"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / file, folder / file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **CONFIGS[name])
    if head == "reward":
        config.num_labels = 1
        LlamaForSequenceClassification(config).save_pretrained(folder)
    else:
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-models")
    return lambda name, head="causal": _model_folder(root, name, head)


def _trl_first_step(method: str, folder: Path, records: list, out: Path, steps: int = 1, **dpo) -> list[dict]:
    """TRL's trainer, one batch holding every record, no clipping (max_grad_norm 0: the norm is still logged)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    common = dict(output_dir=str(out), per_device_train_batch_size=len(records), max_steps=steps, max_grad_norm=0.0,
                  learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                  use_cpu=True, bf16=False, seed=0, max_length=128)
    dataset = Dataset.from_list(records)
    if method in ("dpo", "ipo"):
        dpo = dpo or {"loss_type": ["ipo" if method == "ipo" else "sigmoid"]}
        args = trl.DPOConfig(**common, beta=0.1, **dpo)
        trainer = trl.DPOTrainer(model=str(folder), args=args, train_dataset=dataset, processing_class=tokenizer)
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=ORPOConfig(**common, beta=0.1),
                              train_dataset=dataset, processing_class=tokenizer)
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, beta=0.1, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)
        trainer = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    elif method == "kto":
        args = trl.KTOConfig(**common, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
        trainer = trl.KTOTrainer(model=str(folder), args=args, train_dataset=dataset, processing_class=tokenizer)
    else:  # reward
        args = trl.RewardConfig(**common, center_rewards_coefficient=0.01)
        trainer = trl.RewardTrainer(model=str(folder), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _ftclip_first_step(method: str, folder: Path, records: list, out: Path, steps: int = 1, **settings) -> list[dict]:
    from ftclip.train import train

    data = out / "data.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    method_keys = {"reward": {"reward_model": True, "center_rewards_coefficient": 0.01},
                   "kto": {"rl": "kto", "kto_undesirable_weight": 1.5}}.get(method, {"rl": method})
    recipe = Recipe(base_model=str(folder), datasets=[{"path": str(data), "type": "kto" if method == "kto" else "preference"}],
                    sequence_len=128, micro_batch_size=len(records), max_steps=steps, gradient_clipping={"mode": "off"},
                    learning_rate=1e-3, lr_scheduler="constant", output_dir=str(out / "run"),
                    dataset_cache_dir=str(out / "cache"), **method_keys, **settings)
    return train(recipe, Console(quiet=True), resume=False).records


def _close(ours: float, theirs: float) -> bool:
    return math.isfinite(ours) and abs(ours - theirs) <= RELATIVE * abs(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo", "kto", "reward"])
def test_first_step_matches_trl(models, tmp_path, method, config):
    folder = models(config, "reward" if method == "reward" else "causal")
    records = KTO if method == "kto" else PAIRS
    # dpo and ipo start where the policy is the reference (loss ln 2 and 1/(2β)² whatever the data): their second
    # step, after one identical AdamW update, checks the loss too.
    steps = 2 if method in ("dpo", "ipo") else 1
    theirs = _trl_first_step(method, folder, records, tmp_path / "trl", steps)
    ours = _ftclip_first_step(method, folder, records, tmp_path / "ftclip", steps)
    for step, (mine, reference) in enumerate(zip(ours, theirs), start=1):
        assert _close(mine["loss"], reference["loss"]), (step, mine["loss"], reference["loss"])
        assert _close(mine["grad_norm"], reference["grad_norm"]), (step, mine["grad_norm"], reference["grad_norm"])
    assert len(ours) == len(theirs) == steps


@pytest.mark.slow
def test_first_step_matches_trl_with_the_plain_path_and_precomputed_references(models, tmp_path):
    """The same DPO step through the plain path (whole logits) and with references precomputed before training."""
    folder = models("tied-2-layer")
    theirs = _trl_first_step("dpo", folder, PAIRS, tmp_path / "trl", steps=2)
    for name, settings in {"plain": {"chunked_cross_entropy": False},
                           "precomputed": {"precompute_ref_log_probs": True}}.items():
        ours = _ftclip_first_step("dpo", folder, PAIRS, tmp_path / name, steps=2, **settings)
        for mine, reference in zip(ours, theirs):
            assert _close(mine["loss"], reference["loss"]) and _close(mine["grad_norm"], reference["grad_norm"]), name


@pytest.mark.slow
@pytest.mark.parametrize("trl_settings, ftclip_settings", [
    ({"loss_type": ["hinge"]}, {"dpo_loss_type": ["hinge"]}),
    ({"loss_type": ["robust"], "label_smoothing": 0.2}, {"dpo_loss_type": ["robust"], "dpo_label_smoothing": 0.2}),
    ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, {"dpo_loss_type": ["exo_pair"], "dpo_label_smoothing": 1e-3}),
    ({"loss_type": ["nca_pair"]}, {"dpo_loss_type": ["nca_pair"]}),
    ({"loss_type": ["bco_pair"]}, {"dpo_loss_type": ["bco_pair"]}),
    ({"loss_type": ["sppo_hard"]}, {"dpo_loss_type": ["sppo_hard"]}),
    ({"loss_type": ["apo_zero"]}, {"dpo_loss_type": ["apo_zero"]}),
    ({"loss_type": ["apo_down"]}, {"dpo_loss_type": ["apo_down"]}),
    ({"loss_type": ["sigmoid_norm"]}, {"dpo_loss_type": ["sigmoid_norm"]}),
    ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [0.7, 0.3]},
     {"dpo_loss_type": ["sigmoid", "hinge"], "dpo_loss_weights": [0.7, 0.3]}),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, {"rpo_alpha": 0.5}),  # RPO
], ids=lambda settings: "+".join(settings.get("loss_type", [])) if "loss_type" in settings else None)
def test_dpo_loss_types_match_trl(models, tmp_path, trl_settings, ftclip_settings):
    """TRL's other DPO loss types, their weighted sums and RPO's NLL term: the first two steps (the second after one
    identical AdamW update, where the policy has left the reference)."""
    folder = models("untied-3-layer")
    theirs = _trl_first_step("dpo", folder, PAIRS, tmp_path / "trl", 2, **trl_settings)
    ours = _ftclip_first_step("dpo", folder, PAIRS, tmp_path / "ftclip", 2, **ftclip_settings)
    for mine, reference in zip(ours, theirs):
        assert _close(mine["loss"], reference["loss"]), (mine["loss"], reference["loss"])
        assert _close(mine["grad_norm"], reference["grad_norm"]), (mine["grad_norm"], reference["grad_norm"])


def _ftclip_ids(folder: Path, records: list, tmp_path: Path, **settings):
    from ftclip.data.preference import tokenized_preferences
    from ftclip.modeling import load_tokenizer

    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    recipe = Recipe(base_model=str(folder), rl="dpo", datasets=[{"path": str(data), "type": "preference"}],
                    sequence_len=256, dataset_cache_dir=str(tmp_path / "cache"), **settings)
    examples = tokenized_preferences(recipe, load_tokenizer(recipe))[0]
    return [{name: examples.ids(name, index).tolist() for name in ("prompt", "chosen", "rejected")}
            for index in range(len(examples))]


@pytest.mark.parametrize("records", [PAIRS, CONVERSATIONS], ids=["standard", "conversational"])
def test_tokenization_matches_trl(models, tmp_path, records):
    from datasets import Dataset
    from transformers import AutoTokenizer

    folder = models("tied-2-layer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=256)
    trainer = trl.DPOTrainer(model=str(folder), args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer)
    theirs = [{name: row[f"{name}_ids"] for name in ("prompt", "chosen", "rejected")} for row in trainer.train_dataset]
    assert _ftclip_ids(folder, records, tmp_path) == theirs


def test_implicit_prompt_matches_trl(models, tmp_path):
    """TRL's implicit-prompt layout (no prompt key: the shared beginning of chosen and rejected is the prompt)."""
    from trl.data_utils import extract_prompt

    from ftclip.data.preference_records import extract_prompt as ours

    implicit = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]} for c in CONVERSATIONS]
    implicit += [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PAIRS]
    for record in implicit:
        expected = extract_prompt(record)
        assert ours(record["chosen"], record["rejected"]) == (expected["prompt"], expected["chosen"], expected["rejected"])
