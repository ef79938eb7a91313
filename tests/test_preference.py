"""Preference training on ftclip's own loop: the recipe keys and their combinations, the record formats (ftclip's and
Axolotl's), tokenization and truncation, every method end to end on the tiny model, references (adapter disabled,
frozen copy, precomputed and cached), exact resume, two DDP ranks, reward models, chat and merge on the results,
and the shipped recipes/dpo.yaml. TRL equivalence lives in tests/test_preference_trl.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl, write_recipe
from rich.console import Console
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.data.preference_records import Labelled, Pair, labelled_from_record, pair_from_record
from ftclip.errors import RecipeError
from ftclip.recipe import DatasetSpec, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Rome."},
    {"prompt": "Give the opposite of hot.", "chosen": " cold", "rejected": " warm and sunny"},
    {"prompt": "Count from 3 to 6.", "chosen": " 3, 4, 5, 6", "rejected": " 3, 5, 6"},
    {"prompt": "Write the plural of mouse.", "chosen": " mice", "rejected": " mouses"},
    {"prompt": [{"role": "user", "content": "Capital of Peru?"}], "chosen": [{"role": "assistant", "content": "Lima."}],
     "rejected": [{"role": "assistant", "content": "Cusco."}]},
    {"prompt": [{"role": "user", "content": "Opposite of big?"}], "chosen": [{"role": "assistant", "content": "small"}],
     "rejected": [{"role": "assistant", "content": "large"}]},
    {"prompt": "Translate red into French.", "chosen": " rouge", "rejected": " rot"},
    {"prompt": "What is the capital of Japan?", "chosen": " Tokyo.", "rejected": " Kyoto."},
]
KTO = [
    {"prompt": "What is the capital of France?", "completion": " Paris.", "label": True},
    {"prompt": "Give the opposite of hot.", "completion": " warm", "label": False},
    {"prompt": "Count from 3 to 6.", "completion": " 3, 4, 5, 6", "label": True},
    {"prompt": "Write the plural of mouse.", "completion": " mouses", "label": False},
    {"prompt": "Translate red into French.", "completion": " rouge", "label": True},
    {"prompt": "What is the capital of Japan?", "completion": " Kyoto.", "label": False},
]
BASE = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: {type}\n"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    return {problem.key: problem.message for problem in caught.value.problems}


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


@pytest.fixture
def preference_recipe(tmp_path, tiny_model_dir, pairs_file):
    def make(name: str = "pref.yaml", data: Path | None = None, kind: str = "preference", **overrides) -> Path:
        settings = {"rl": "dpo", "max_steps": 2, "micro_batch_size": 2, "val_set_size": 2, "eval_steps": 2,
                    "learning_rate": 1e-2, **overrides}
        path = write_recipe(tmp_path, tiny_model_dir, data or pairs_file, name, **settings)
        recipe = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
        recipe["datasets"] = [{"path": str(data or pairs_file), "type": kind}]
        path.write_text(__import__("yaml").safe_dump(recipe))
        return path

    return make


def run(path: Path, **kwargs):
    from ftclip.train import train

    return train(load_recipe(path), Console(quiet=True, width=200), **kwargs)


# ---------------------------------------------------------------- recipe keys and combinations


def test_axolotl_spellings():
    recipe = parse_recipe(BASE.format(type="chat_template") + "rl: dpo\nbeta: 0.3\ndpo_loss_type: ipo\n")
    assert recipe.rl_beta == 0.3 and recipe.dpo_loss_type == ["ipo"]
    assert recipe.datasets[0].type == "chat_template.default"  # Axolotl's DPO format under rl
    assert parse_recipe(BASE.format(type="chat_template.default")).datasets[0].type == "chat"  # SFT otherwise
    assert "rl_beta" in problems(BASE.format(type="preference") + "rl: dpo\nbeta: 0.3\nrl_beta: 0.2\n")["recipe"]


@pytest.mark.parametrize("extra, key, words", [
    ("rl: dpo\nreward_model: true\n", "reward_model", "drop one"),
    ("rl: dpo\nsample_packing: true\n", "sample_packing", "not packed"),
    ("rl: dpo\ntrain_on_inputs: true\n", "train_on_inputs", "prompt tokens never count"),
    ("rl: orpo\nprecompute_ref_log_probs: true\n", "precompute_ref_log_probs", "no reference model"),
    ("rl: simpo\nprecompute_ref_log_probs: true\n", "precompute_ref_log_probs", "no reference model"),
    ("reward_model: true\nprecompute_ref_log_probs: true\n", "precompute_ref_log_probs", "no reference model"),
    ("rl: orpo\nrl_beta: 0.2\n", "rl_beta", "orpo_alpha"),
    ("rl: dpo\norpo_alpha: 0.2\n", "orpo_alpha", "applies to orpo, not dpo"),
    ("rl: ipo\ndpo_loss_type: [hinge]\n", "dpo_loss_type", "rl: ipo is rl: dpo with dpo_loss_type: [ipo]"),
    ("rl: dpo\nsimpo_gamma: 1.0\n", "simpo_gamma", "applies to simpo"),
    ("rl: dpo\nkto_desirable_weight: 2.0\n", "kto_desirable_weight", "applies to kto"),
    ("rl: dpo\ncenter_rewards_coefficient: 0.01\n", "center_rewards_coefficient", "reward_model"),
    ("rl: dpo\ndpo_loss_type: [sigmoid, hinge]\ndpo_loss_weights: [1.0]\n", "dpo_loss_weights", "one per"),
    ("rl: dpo\ndpo_label_smoothing: 0.1\n", "dpo_label_smoothing", "robust and exo_pair"),
    ("rl: dpo\ndpo_loss_type: [exo_pair]\n", "dpo_label_smoothing", "exo_pair needs"),
    ("rl: dpo\nmax_prompt_len: 600\n", "max_prompt_len", "no room"),
    ("rl: dpo\ndistributed: {strategy: fsdp}\n", "precompute_ref_log_probs", "not be sharded"),
    ("rl: kto\nadapter: lora\nlora_model_dir: ./adapter\n", "precompute_ref_log_probs", "adapter included"),
    ("rl_beta: 0.1\n", "rl_beta", "set rl"),
])
def test_combinations_that_make_no_sense_are_refused(extra, key, words):
    kind = "kto" if "rl: kto" in extra else "preference"
    found = problems(BASE.format(type=kind) + extra)
    assert words in found[key], found


@pytest.mark.parametrize("kind, extra, words", [
    ("preference", "", "is preference data: set rl"),
    ("alpaca", "rl: dpo\n", "is SFT data, and dpo trains on preferences"),
    ("preference", "rl: kto\n", "rl: kto reads single completions"),
    ("kto", "rl: dpo\n", "which only rl: kto trains on"),
    ("chat", "reward_model: true\n", "is SFT data, and reward_model trains on preferences"),
])
def test_data_must_fit_the_method(kind, extra, words):
    assert words in problems(BASE.format(type=kind) + extra)["datasets.0.type"]


def test_sensible_recipes_validate():
    parse_recipe(BASE.format(type="chatml.intel") + "rl: dpo\ndpo_loss_type: [robust]\ndpo_label_smoothing: 0.1\n")
    parse_recipe(BASE.format(type="llama3.ultra") + "rl: kto\nrl_beta: 0.5\nkto_desirable_weight: 0.2\n")
    parse_recipe(BASE.format(type="bradley_terry.chat_template") + "reward_model: true\ncenter_rewards_coefficient: 0.01\n")
    parse_recipe(BASE.format(type="preference") + "rl: simpo\nsimpo_gamma: 1.0\ncpo_alpha: 0.5\nrl_beta: 2.0\n")
    parse_recipe(BASE.format(type="preference") + "rl: dpo\ndistributed: {strategy: fsdp}\nprecompute_ref_log_probs: true\n")


# ---------------------------------------------------------------- record formats


def spec(kind: str, rl: str | None = "dpo", **fields) -> DatasetSpec:
    parsed = DatasetSpec(path="x.jsonl", type=kind, **fields)
    parsed._rl = rl
    return parsed


CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
TURNS = lambda answer: [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer}]  # noqa: E731


@pytest.mark.parametrize("kind, record, expected", [
    # Axolotl's prompt_strategies/dpo/chatml.py and llama3.py, string for string
    ("chatml.intel", {"system": "Be brief.", "question": "Q?", "chosen": "A", "rejected": "B"},
     Pair(CHATML_PROMPT, "A<|im_end|>", "B<|im_end|>")),
    ("chatml.argilla", {"system": "Be brief.", "instruction": "Q?", "chosen_response": "A", "rejected_response": "B"},
     Pair(CHATML_PROMPT, "A<|im_end|>", "B<|im_end|>")),
    ("chatml", {"system": "Be brief.", "prompt": "Q?", "chosen": "A", "rejected": "B"},
     Pair(CHATML_PROMPT, "A<|im_end|>", "B<|im_end|>")),
    ("chatml.icr", {"system": None, "input": "Q?", "chosen": "A", "rejected": "B"},
     Pair(CHATML_PROMPT.split("<|im_end|>\n", 1)[1], "A<|im_end|>", "B<|im_end|>")),
    ("chatml.ultra", {"prompt": "Q?", "chosen": TURNS("A"), "rejected": TURNS("B")},
     Pair(CHATML_PROMPT.split("<|im_end|>\n", 1)[1], "A<|im_end|>", "B<|im_end|>")),
    ("llama3.prompt_pairs", {"prompt": "Q?", "chosen": "A", "rejected": "B"}, Pair(LLAMA3_PROMPT, "A<|eot_id|>", "B<|eot_id|>")),
    ("llama3.argilla_chat", {"chosen": TURNS("A"), "rejected": TURNS("B")}, Pair(LLAMA3_PROMPT, "A<|eot_id|>", "B<|eot_id|>")),
    # conversational: rendered later by the recipe's chat template
    ("chat_template.argilla_chat", {"chosen": TURNS("A"), "rejected": TURNS("B")},
     Pair(TURNS("A")[:1], TURNS("A")[1:], TURNS("B")[1:])),
    ("bradley_terry.chat_template", {"system": "S", "input": "Q?", "chosen": "A", "rejected": "B"},
     Pair([{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
          [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}])),
    ("preference", {"chosen": "Q? A", "rejected": "Q? B"}, Pair("Q?", " A", " B")),  # TRL's implicit prompt
])
def test_pair_formats(kind, record, expected):
    assert pair_from_record(record, spec(kind)) == expected


def test_chat_template_default_reads_axolotl_fields_and_roles():
    record = {"conversation": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q?"}],
              "better": {"from": "gpt", "value": "A"}, "worse": [{"from": "gpt", "value": "B"}]}
    parsed = pair_from_record(record, spec("chat_template.default", field_messages="conversation", field_chosen="better",
                                           field_rejected="worse", roles={"user": ["human"], "assistant": ["gpt"]},
                                           message_property_mappings={"role": "from", "content": "value"}))
    assert parsed == Pair([{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
                          [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}])


@pytest.mark.parametrize("kind, record, expected", [
    ("kto", {"prompt": "Q?", "completion": " A", "label": True}, Labelled("Q?", " A", True)),
    ("chatml.intel", {"question": "Q?", "completion": "A", "label": False},
     Labelled(CHATML_PROMPT.split("<|im_end|>\n", 1)[1], "A<|im_end|>", False)),
    ("llama3.argilla", {"instruction": "Q?", "completion": "A", "label": True}, Labelled(LLAMA3_PROMPT, "A<|eot_id|>", True)),
    ("llama3.argilla_chat", {"completion": TURNS("A"), "label": 1}, Labelled(LLAMA3_PROMPT, "A<|eot_id|>", True)),
])
def test_kto_formats(kind, record, expected):
    assert labelled_from_record(record, spec(kind, rl="kto")) == expected


@pytest.mark.parametrize("kind, rl, record, words", [
    ("preference", "dpo", {"prompt": "Q", "chosen": "A"}, "needs 'chosen' and 'rejected'"),
    ("preference", "dpo", {"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"},
     "all be strings or all be message lists"),
    ("chatml.intel", "dpo", {"prompt": "Q", "chosen": "A", "rejected": "B"}, "needs string 'question'"),
    ("kto", "kto", {"prompt": "Q", "completion": "A", "label": "yes"}, "boolean 'label'"),
    ("chatml.icr", "kto", {"input": "Q", "completion": "A", "label": True}, "not one of Axolotl's KTO formats"),
])
def test_bad_records_say_what_the_format_needs(kind, rl, record, words):
    parsed = (labelled_from_record if rl == "kto" else pair_from_record)(record, spec(kind, rl=rl))
    assert isinstance(parsed, str) and words in parsed


def test_validate_names_the_file_and_the_record(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [{"prompt": "Q", "chosen": "A"}])
    path = write_recipe(tmp_path, tiny_model_dir, data, rl="dpo")
    text = path.read_text().replace("type: alpaca", "type: preference")
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "pairs.jsonl: record 3: a preference record needs 'chosen' and 'rejected'" in result.output


# ---------------------------------------------------------------- tokenization and truncation


def test_prompt_tokens_never_count_and_truncation_is_counted(preference_recipe, tmp_path):
    from ftclip.data.pipeline import prepare
    from ftclip.modeling import load_tokenizer
    from ftclip.train import describe_data

    long_prompt = {"prompt": "Count " + " ".join(str(n) for n in range(60)), "chosen": " yes", "rejected": " no"}
    data = write_jsonl(tmp_path / "long.jsonl", PAIRS + [long_prompt, {"prompt": "x " * 200, "chosen": " a", "rejected": " b"}])
    recipe = load_recipe(preference_recipe("long.yaml", data=data, max_prompt_len=40, sequence_len=60))
    tokenizer = load_tokenizer(recipe)
    prepared = prepare(recipe, tokenizer)
    examples = prepared.examples
    assert len(examples) == len(PAIRS) + 2  # both long prompts are cut to their last 40 tokens, the pairs kept
    line = describe_data(prepared)
    assert f"{len(PAIRS) + 2} pairs" in line
    assert "prompts cut to their last 40 tokens (max_prompt_len): 2" in line
    eos = tokenizer.eos_token_id
    for index in range(len(examples)):
        prompt, chosen = examples.ids("prompt", index), examples.ids("chosen", index)
        assert len(prompt) <= 40 and len(prompt) + len(chosen) <= 60
    # A text pair: the prompt's ids, then the answer's with eos; nothing of the prompt in the answer.
    first = {name: examples.ids(name, 0).tolist() for name in ("prompt", "chosen", "rejected")}
    assert first["prompt"] == tokenizer("What is the capital of France?")["input_ids"]
    assert first["chosen"] == tokenizer(" Paris.", add_special_tokens=False)["input_ids"] + [eos]
    rows = prepared.train.rows(range(len(prepared.train)))
    from ftclip.objectives.preference import PairObjective, collate_answers

    inputs = collate_answers([rows[0].prompt] * 2, [rows[0].chosen, rows[0].rejected], tokenizer.pad_token_id)
    scored = (inputs["labels"] != -100).sum(-1).tolist()
    assert scored == [len(rows[0].chosen), len(rows[0].rejected)]
    assert PairObjective(recipe).step_items([rows[:2], rows[2:3]]) == 3


def test_sequence_len_cuts_answers_and_drops_pairs_whose_prompt_fills_it(preference_recipe, tmp_path):
    from ftclip.data.pipeline import prepare
    from ftclip.modeling import load_tokenizer
    from ftclip.train import describe_data

    data = write_jsonl(tmp_path / "cut.jsonl", PAIRS + [{"prompt": "Q", "chosen": " a" * 100, "rejected": " b"},
                                                         {"prompt": "x " * 100, "chosen": " a", "rejected": " b"}])
    recipe = load_recipe(preference_recipe("cut.yaml", data=data, sequence_len=40))
    line = describe_data(prepare(recipe, load_tokenizer(recipe)))
    assert "answers cut at sequence_len 40: 1" in line and "left out, the prompt alone filling sequence_len: 1" in line


# ---------------------------------------------------------------- every method, end to end


@pytest.mark.parametrize("method", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_each_method_trains_with_the_shared_loop_and_telemetry(preference_recipe, tmp_path, method):
    data = write_jsonl(tmp_path / "kto.jsonl", KTO) if method == "kto" else None
    path = preference_recipe(f"{method}.yaml", data=data, kind="kto" if method == "kto" else "preference", rl=method,
                             gradient_accumulation_steps=2, gradient_clipping={"mode": "norm", "max_norm": 0.01})
    result = run(path)
    first, last = result.records
    assert result.steps == 2 and last["clipped"]  # the shared clip acted on a preference gradient
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    expected |= {"kl"} if method == "kto" else {"rewards/accuracy"}
    assert expected <= set(first) and {f"eval_{name}" for name in expected} <= set(last)
    assert all(math.isfinite(first[name]) for name in expected)
    if method in ("dpo", "kto"):  # the policy starts as the reference: no reward yet, DPO's loss is ln 2
        assert first["per_step"]["loss"][0] == pytest.approx(math.log(2) if method == "dpo" else 0.5, abs=1e-6)
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_reference_is_the_adapter_disabled_and_full_fine_tuning_keeps_a_frozen_copy(preference_recipe):
    from ftclip.data.pipeline import prepare
    from ftclip.distributed import Distributed
    from ftclip.modeling import load_model, load_tokenizer
    from ftclip.objectives import SetupContext, objective_for

    for adapter, words in (("lora", "adapter disabled"), (None, "frozen copy")):
        recipe = load_recipe(preference_recipe(f"{adapter}.yaml", adapter=adapter))
        tokenizer = load_tokenizer(recipe)
        model = load_model(recipe, torch.device("cpu"), tokenizer)
        objective = objective_for(recipe)
        note = objective.prepare(model, prepare(recipe, tokenizer), SetupContext(recipe, torch.device("cpu"),
                                                                               Distributed(), tokenizer.pad_token_id))
        assert words in note
        frozen = objective.reference.frozen
        assert (frozen is None) == (adapter == "lora")
        if frozen is not None:
            assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training


def test_precomputed_references_are_cached_beside_the_tokens(preference_recipe, tmp_path):
    path = preference_recipe("pre.yaml", adapter=None, precompute_ref_log_probs=True, learning_rate=1e-4)
    console_output = []

    def train_once(name: str):
        from ftclip.train import train

        console = Console(record=True, width=200)
        result = train(load_recipe(path).model_copy(update={"output_dir": str(tmp_path / name)}), console, resume=False)
        console_output.append(console.export_text())
        return result

    first, second = train_once("a"), train_once("b")
    assert "computed before training and cached" in console_output[0]
    assert "read from the cache" in console_output[1]
    assert [r["loss"] for r in first.records] == [r["loss"] for r in second.records]
    assert len(list((tmp_path / "token-cache").glob("*/reference-*.npy"))) == 1


def test_resume_reproduces_the_uninterrupted_dpo_run_exactly(preference_recipe, tmp_path):
    from safetensors.torch import load_file

    settings = dict(max_steps=6, save_steps=2, save_total_limit=0, lora_dropout=0.1, gradient_accumulation_steps=2,
                    eval_steps=None, val_set_size=0)
    reference = run(preference_recipe("full.yaml", output_dir=str(tmp_path / "full"), **settings))
    path = preference_recipe("cut.yaml", output_dir=str(tmp_path / "cut"), **settings)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    checkpoints = tmp_path / "cut" / "checkpoints"
    for step in (4, 6):
        shutil.rmtree(checkpoints / f"step-{step}")
    (checkpoints / "latest").write_text("step-2")
    resumed = run(path)
    assert resumed.resumed_from == checkpoints / "step-2"

    def per_step(result, key):
        return [value for record in result.records for value in record["per_step"][key]]

    assert per_step(resumed, "loss") == per_step(reference, "loss")
    assert [r["rewards/margins"] for r in resumed.records] == [r["rewards/margins"] for r in reference.records]
    ours, theirs = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("cut", "full"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


# ---------------------------------------------------------------- two DDP ranks


@pytest.mark.slow
@pytest.mark.parametrize("strategy, adapter, precompute", [
    ("ddp", "lora", False), ("ddp", None, False), ("fsdp", "lora", False), ("fsdp", None, True),
], ids=["ddp-lora", "ddp-full-frozen-copy", "fsdp-lora", "fsdp-full-precomputed"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(preference_recipe, tmp_path, strategy, adapter, precompute):
    import os

    common = dict(max_steps=2, gradient_accumulation_steps=2, lora_dropout=0.0, adapter=adapter, val_set_size=0,
                  eval_steps=None, gradient_clipping={"mode": "norm", "max_norm": 0.5},
                  precompute_ref_log_probs=precompute)
    single = run(preference_recipe("one.yaml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    path = preference_recipe("two.yaml", micro_batch_size=2, output_dir=str(tmp_path / "two"),
                             dataset_cache_dir=str(tmp_path / "cache-ddp"), distributed={"strategy": strategy}, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ftclip",
                           "train", str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for ours, theirs in zip(lines, single.records):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracy", "logps/chosen"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert f"× 2 ranks ({strategy})" in done.stdout


# ---------------------------------------------------------------- reward models


@pytest.mark.parametrize("adapter", ["lora", None])
def test_reward_model_saves_a_sequence_classifier_that_chat_refuses(preference_recipe, tmp_path, adapter):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = preference_recipe(f"reward-{adapter}.yaml", rl=None, reward_model=True, adapter=adapter,
                             center_rewards_coefficient=0.01, output_dir=str(tmp_path / "rm"))
    result = run(path)
    assert {"rewards/accuracy", "rewards/margins", "eval_rewards/accuracy"} <= set(result.records[-1])
    folder = tmp_path / "rm" / ("adapter" if adapter else "model")
    if adapter:
        merged = runner.invoke(app, ["merge", str(tmp_path / "rm")])
        assert merged.exit_code == 0, merged.output
        assert "AutoModelForSequenceClassification" in merged.output
        folder = tmp_path / "rm" / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        scores = model(**tokenizer(["What is the capital of France? Paris."], return_tensors="pt")).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
    refused = runner.invoke(app, ["chat", str(tmp_path / "rm"), "--prompt", "Hi"])
    assert refused.exit_code == 2 and "is a reward model" in refused.output and "Traceback" not in refused.output


# ---------------------------------------------------------------- chat and merge on a DPO result, the shipped recipe


def test_chat_and_merge_work_on_a_dpo_run(preference_recipe, tmp_path):
    run(preference_recipe("chat.yaml", output_dir=str(tmp_path / "dpo")))
    answer = runner.invoke(app, ["chat", str(tmp_path / "dpo"), "--prompt", "Capital of Peru?", "--max-new-tokens", "4"])
    assert answer.exit_code == 0, answer.output
    merged = runner.invoke(app, ["merge", str(tmp_path / "dpo")])
    assert merged.exit_code == 0 and "AutoModelForCausalLM" in merged.output
    again = runner.invoke(app, ["chat", str(tmp_path / "dpo" / "merged"), "--prompt", "Capital of Peru?",
                                "--max-new-tokens", "4"])
    assert again.exit_code == 0 and again.output == answer.output  # greedy: the merged model answers the same


@pytest.mark.slow
def test_shipped_dpo_recipe_raises_eval_reward_accuracy_above_0_8(tmp_path):
    out = tmp_path / "dpo"
    done = subprocess.run([sys.executable, "-m", "ftclip", "train", str(REPO / "recipes" / "dpo.yaml"),
                           "--output-dir", str(out), "--set", f"dataset_cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [record["eval_rewards/accuracy"] for record in records if "eval_rewards/accuracy" in record]
    assert evals[-1] > 0.8 and records[-1]["rewards/accuracy"] > 0.8
    assert "266 pairs" in done.stdout and "eval-acc" in done.stdout
    report = runner.invoke(app, ["report", str(out), "--no-plot"])
    assert report.exit_code == 0 and "eval rewards/accuracy" in report.output


# ---------------------------------------------------------------- import-axolotl


AXOLOTL_EXAMPLES = ["llama-3__instruct-dpo-lora-8b.yml", "qwen2__dpo.yaml", "mistral__orpo__mistral-qlora-orpo.yml",
                    "llama-3__qlora-1b-kto.yaml", "qwen2__reward-model.yaml"]


@pytest.mark.parametrize("name", AXOLOTL_EXAMPLES)
def test_axolotl_preference_examples_import_and_validate(name):
    from ftclip.axolotl import import_config

    result = import_config(REPO / "tests" / "fixtures" / "axolotl" / name)
    assert result.ok, (result.refused, result.problems)
    recipe = parse_recipe(result.text)
    method = recipe.rl or "reward_model"
    assert method == {"dpo": "dpo", "orpo": "orpo", "kto": "kto", "reward": "reward_model"}[
        next(word for word in ("dpo", "orpo", "kto", "reward") if word in name)]
    assert all(dataset.preference_kind for dataset in recipe.datasets)


def import_snippet(tmp_path: Path, text: str):
    from ftclip.axolotl import import_config

    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\nadapter: lora\nlora_target_linear: true\n" + text)
    return import_config(path)


@pytest.mark.parametrize("text, expected, dropped", [
    ("rl: simpo\ndatasets: [{path: d.jsonl, type: chatml.intel}]\n", {"rl": "simpo", "cpo_alpha": 1.0}, set()),
    ("rl: orpo\nrl_beta: 0.2\norpo_alpha: 0.1\ndatasets: [{path: d.jsonl, type: chat_template.argilla}]\n",
     {"orpo_alpha": 0.2}, {"orpo_alpha"}),
    ("rl: dpo\ntrl: {beta: 0.3}\nrl_beta: 0.1\ndatasets: [{path: d.jsonl, type: chat_template}]\n",
     {"rl_beta": 0.3}, {"rl_beta"}),
    ("rl: dpo\ndpo_beta: 0.25\ndpo_label_smoothing: 0.1\nkto_desirable_weight: 2\n"
     "datasets: [{path: d.jsonl, type: llama3.ultra}]\n", {"rl_beta": 0.25}, {"dpo_label_smoothing", "kto_desirable_weight"}),
    ("rl: dpo\ndpo_loss_type: [robust]\ndpo_label_smoothing: 0.1\nrl_adapter_ref_model: true\n"
     "datasets: [{path: d.jsonl, type: chatml.prompt_pairs}]\n", {"dpo_label_smoothing": 0.1}, {"rl_adapter_ref_model"}),
    ("reward_model: true\nnum_labels: 1\nmodel_type: AutoModelForSequenceClassification\ncenter_rewards_coefficient: 0.01\n"
     "datasets: [{path: d.jsonl, type: bradley_terry.chat_template}]\n", {"center_rewards_coefficient": 0.01},
     {"num_labels", "model_type"}),
])
def test_axolotl_preference_keys_mean_what_axolotl_does_with_them(tmp_path, text, expected, dropped):
    result = import_snippet(tmp_path, text)
    assert result.ok, (result.refused, result.problems)
    recipe = parse_recipe(result.text)
    assert {key: getattr(recipe, key) for key in expected} == expected
    assert dropped <= {key for key, _ in result.dropped}


@pytest.mark.parametrize("text, key, words", [
    ("rl: grpo\ndatasets: [{path: d.jsonl, type: chatml.intel}]\n", "rl", "online RL"),
    ("rl: dpo\ndatasets: [{path: d.jsonl, type: alpaca}]\n", "datasets[0].type", "not a preference format"),
    ("rl: dpo\ndatasets: [{path: d.jsonl, type: zephyr.nectar}]\n", "datasets[0].type", "not a preference format"),
    ("rl: dpo\ntrl: {use_vllm: true}\ndatasets: [{path: d.jsonl, type: chatml.intel}]\n", "trl", "use_vllm"),
    ("rl: dpo\ndpo_use_weighting: true\ndatasets: [{path: d.jsonl, type: chatml.intel}]\n", "dpo_use_weighting", "WPO"),
])
def test_axolotl_preference_settings_ftclip_lacks_are_refused(tmp_path, text, key, words):
    result = import_snippet(tmp_path, text)
    refused = dict(result.refused)
    assert not result.ok and words in refused[key]


def test_preprocess_shows_both_answers_with_the_prompt_masked(preference_recipe):
    shown = subprocess.run([sys.executable, "-m", "ftclip", "preprocess", str(preference_recipe()), "--show", "1",
                            "--json"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    chosen, rejected = (json.loads(line) for line in shown.stdout.splitlines())
    prompt = [label for label in chosen["labels"] if label == -100]
    assert chosen["input_ids"][:len(prompt)] == rejected["input_ids"][:len(prompt)]  # one prompt, two answers
    assert chosen["labels"][len(prompt):] == chosen["input_ids"][len(prompt):]


def test_gradient_checkpointing_gives_the_same_dpo_step(preference_recipe, tmp_path):
    plain = run(preference_recipe("plain.yaml", output_dir=str(tmp_path / "a"), max_steps=1))
    checkpointed = run(preference_recipe("ckpt.yaml", output_dir=str(tmp_path / "b"), max_steps=1,
                                         gradient_checkpointing=True))
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert checkpointed.records[0][key] == pytest.approx(plain.records[0][key], rel=1e-5, abs=1e-7)
