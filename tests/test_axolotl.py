"""Axolotl configs: the importer over a corpus of real configs from Axolotl's repository
(tests/fixtures/axolotl, sources in SOURCES.md), the Axolotl keys the recipe now takes natively,
and validate's messages for the ones it does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ftclip.axolotl import AXOLOTL_KEYS, import_config, mapping_markdown
from ftclip.cli import app
from ftclip.errors import RecipeError
from ftclip.recipe import load_recipe, parse_recipe, resolve_schedule, schedule_steps
from ftclip.recipe_files import read_recipe

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO / "tests" / "fixtures" / "axolotl"
CORPUS = sorted(path for path in CORPUS_DIR.iterdir() if path.suffix in (".yml", ".yaml"))
BASE = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
runner = CliRunner()


def imported(name: str):
    """The recipe the importer makes from a corpus config (it must be written)."""
    result = import_config(CORPUS_DIR / name)
    assert result.ok, (result.refused, result.problems)
    return parse_recipe(result.text)


# ---------------------------------------------------------------- the corpus


def test_corpus_is_real_and_sourced():
    sources = (CORPUS_DIR / "SOURCES.md").read_text()
    assert 30 <= len(CORPUS) <= 60
    for path in CORPUS:
        assert f"`{path.name}`" in sources, f"{path.name} has no row in SOURCES.md"
    assert sources.count("\n| `") == len(CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_every_corpus_config_imports_or_is_refused_with_reasons(path):
    result = import_config(path)
    if result.ok:
        recipe = parse_recipe(result.text, "imported.yaml")  # schema-valid (no filesystem checks on this branch)
        assert recipe.datasets
    else:
        assert result.refused or result.problems
        assert result.text is None
        for key, why in result.refused:
            assert key and len(why) > 10


def test_corpus_outcomes():
    written = {path.name for path in CORPUS if import_config(path).ok}
    assert len(written) >= 21
    refused = {path.name: {key for key, _ in import_config(path).refused} for path in CORPUS}
    assert refused["qwen3.5__27b-qlora.yaml"] == set()  # adamw_torch_4bit: torchao's AdamW4bit
    assert refused["llama-3__instruct-dpo-lora-8b.yml"] == set()  # rl: dpo, trained natively (docs/preference.md)
    assert refused["llava__lora-7b.yaml"] == set()  # a vision-language run (processor_type, docs/vision.md)
    assert refused["archived__pythia__lora.yml"] == set()  # lora_fan_in_fan_out: peft's fan_in_fan_out
    assert "relora_steps" in refused["llama-2__relora.yml"]


def test_cli_imports_the_whole_corpus_in_one_process(tmp_path):
    command = [sys.executable, "-m", "ftclip", "import-axolotl", *map(str, CORPUS), "--output-dir", str(tmp_path),
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 2  # some are refused
    report = json.loads(done.stdout)
    assert len(report) == len(CORPUS)
    for entry in report:
        target = tmp_path / (Path(entry["source"]).stem + ".ftclip.yaml")
        assert target.exists() == entry["written"]
        if entry["written"]:
            load_recipe(target)
        else:
            assert entry["refused"] or entry["problems"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_llama3_qlora_values_are_preserved():
    recipe = imported("llama-3__qlora-1b.yml")
    assert recipe.base_model == "NousResearch/Llama-3.2-1B"
    assert (recipe.adapter, recipe.load_in_4bit, recipe.load_in_8bit) == ("qlora", True, False)
    assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout) == (32, 16, 0.05)
    assert recipe.lora_target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert (recipe.learning_rate, recipe.lr_scheduler, recipe.warmup_steps, recipe.warmup_ratio) == (2e-4, "cosine", 10, None)
    assert (recipe.micro_batch_size, recipe.gradient_accumulation_steps, recipe.num_epochs) == (2, 4, 1)
    assert recipe.optimizer == "adamw_8bit"  # adamw_bnb_8bit
    assert (recipe.gradient_clipping.mode, recipe.gradient_clipping.max_norm) == ("norm", 1.0)
    assert (recipe.bf16, recipe.tf32, recipe.fp16) == ("auto", False, False)
    assert (recipe.sequence_len, recipe.sample_packing, recipe.train_on_inputs) == (2048, True, False)
    assert recipe.attn_implementation == "flash_attention_2"  # flash_attention: true
    assert (recipe.val_set_size, recipe.evals_per_epoch, recipe.saves_per_epoch) == (0.1, 4, 1)
    assert recipe.save_total_limit == 0  # Axolotl keeps every checkpoint
    assert recipe.dataset_cache_dir == "last_run_prepared"
    assert [(d.path, d.type) for d in recipe.datasets] == [("teknium/GPT4-LLM-Cleaned", "alpaca")]
    assert recipe.special_tokens.pad_token == "<|end_of_text|>"


def test_full_finetune_with_fsdp_and_adam_settings():
    recipe = imported("phi__phi3-ft-fsdp.yml")
    assert recipe.adapter is None and recipe.trust_remote_code
    assert (recipe.adam_beta2, recipe.adam_epsilon, recipe.weight_decay) == (0.95, 1e-5, 0.1)
    assert recipe.gradient_clipping.max_norm == 1.0
    assert (recipe.warmup_ratio, recipe.warmup_steps) == (0.1, 0)
    assert recipe.distributed.strategy == "fsdp"
    assert (recipe.micro_batch_size, recipe.gradient_accumulation_steps, recipe.num_epochs) == (12, 2, 2)
    assert recipe.tf32 is True and recipe.gradient_checkpointing_kwargs == {"use_reentrant": True}


def test_chat_dataset_options_are_preserved():
    recipe = imported("llama-3__fft-8b-liger-fsdp.yaml")
    [dataset] = recipe.datasets
    assert (dataset.type, dataset.split, dataset.field_messages) == ("chat", "train[:20%]", "conversations")
    assert dataset.message_property_mappings == {"role": "from", "content": "value"}
    assert recipe.chat_template == "llama3"
    assert recipe.liger_fused_linear_cross_entropy is True
    assert recipe.special_tokens.eos_token == "<|eot_id|>"

    recipe = imported("llama-3__instruct-lora-8b.yml")  # the older message_field_role/content spelling
    [dataset] = recipe.datasets
    assert dataset.message_property_mappings == {"role": "role", "content": "content"}
    assert dataset.roles == {"user": ["user"], "assistant": ["assistant"]}
    assert recipe.load_in_8bit and recipe.target_modules == "all-linear"


def test_deepspeed_stage_picks_the_strategy(tmp_path):
    assert imported("jamba__qlora_deepspeed.yaml").distributed.strategy == "ddp"  # zero2.json
    stage3 = tmp_path / "ds.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = tmp_path / "axolotl.yml"
    config.write_text(BASE + f"deepspeed: {stage3}\n")
    result = import_config(config)
    assert parse_recipe(result.text).distributed.strategy == "fsdp"
    config.write_text(BASE + "deepspeed: my_settings.json\n")
    assert [key for key, _ in import_config(config).refused] == ["deepspeed"]


def test_eot_tokens_cut_cross_entropy_and_explicit_zero_dropout():
    recipe = imported("LiquidAI__lfm2-350m-fft.yaml")
    assert recipe.chunked_cross_entropy and recipe.bf16 is True and recipe.gradient_checkpointing is False
    assert imported("olmo3__olmo3-7b-qlora.yaml").chunked_cross_entropy  # CutCrossEntropyPlugin
    assert imported("qwen3__8b-lora-fused-attn.yaml").lora_dropout == 0.0


def test_axolotl_defaults_are_written_out_where_ftclip_differs(tmp_path):
    config = tmp_path / "minimal.yml"
    config.write_text(BASE + "adapter: lora\nlora_target_linear: true\nmax_grad_norm:\nlora_dropout:\n")
    result = import_config(config)
    recipe = parse_recipe(result.text)
    assert (recipe.lora_dropout, recipe.bf16, recipe.tf32, recipe.save_total_limit) == (0.0, "auto", "auto", 0)
    assert recipe.warmup_ratio == 0.03  # Axolotl's default warmup
    assert recipe.gradient_clipping.max_norm == 1.0 and recipe.gradient_clipping.mode == "norm"
    assert "# not set in the Axolotl config: Axolotl's default lora_dropout 0.0" in result.text


def test_written_recipe_says_where_each_value_came_from():
    text = import_config(CORPUS_DIR / "llama-3__qlora-1b.yml").text
    assert "# from optimizer: adamw_bnb_8bit\noptimizer: adamw_8bit\n" in text
    assert "# from dataset_prepared_path: last_run_prepared\ndataset_cache_dir: last_run_prepared\n" in text


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_ftclip_recipe_passes_through_unchanged_in_meaning(path):
    result = import_config(path)
    assert result.ok and result.native
    assert parse_recipe(result.text).model_dump() == load_recipe(path).model_dump()


def test_refused_config_writes_nothing_and_exits_2(tmp_path):
    target = tmp_path / "out.yaml"
    result = runner.invoke(app, ["import-axolotl", str(CORPUS_DIR / "llama-2__relora.yml"), "-o", str(target)])
    assert result.exit_code == 2
    assert "refused" in result.output and "relora_steps" in result.output
    assert not target.exists()
    result = runner.invoke(app, ["import-axolotl", str(CORPUS_DIR / "llama-3__lora-1b.yml"), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "mapped   lora_r → lora_r: 16" in result.output and "dropped  strict" in result.output
    assert load_recipe(target).lora_r == 16


def test_unreadable_inputs_are_problems_not_tracebacks(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("base_model: [unclosed\n")
    result = runner.invoke(app, ["import-axolotl", str(broken), str(tmp_path / "missing.yml"), "--json"])
    assert result.exit_code == 2
    report = json.loads(result.output)
    assert "YAML" in report[0]["problems"][0] and report[1]["problems"] == ["no such file"]
    result = runner.invoke(app, ["import-axolotl", str(broken), str(broken), "-o", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2


# ---------------------------------------------------------------- native recipe keys


def test_empty_value_means_not_set():
    recipe = parse_recipe("base_model: org/model\nmax_grad_norm:\nlora_dropout:\nfp16:\nsave_total_limit:\n"
                          "special_tokens:\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n    split:\n")
    assert (recipe.gradient_clipping.mode, recipe.gradient_clipping.max_norm) == ("norm", 1.0)
    assert (recipe.lora_dropout, recipe.fp16, recipe.save_total_limit) == (0.05, False, 3)
    assert recipe.datasets[0].split == "train"
    for off in ("false", "0", "off"):
        assert parse_recipe(BASE + f"max_grad_norm: {off}\n").gradient_clipping.mode == "off"


@pytest.mark.parametrize("given, optimizer", [("adamw_bnb_8bit", "adamw_8bit"), ("adamw_torch_fused", "adamw_torch_fused")])
def test_hugging_face_optimizer_names(given, optimizer):
    assert parse_recipe(BASE + f"optimizer: {given}\n").optimizer == optimizer


@pytest.mark.parametrize("given, scheduler", [("constant_with_warmup", "constant"), ("cosine_with_min_lr", "cosine")])
def test_hugging_face_scheduler_names(given, scheduler):
    assert parse_recipe(BASE + f"lr_scheduler: {given}\n").lr_scheduler == scheduler


@pytest.mark.parametrize("extra, key, text", [
    ("optimizer: adamw_torch_8bit\n", "optimizer", "bitsandbytes' adamw_8bit"),
    ("optimizer: lion_8bit\n", "optimizer", "not an optimizer ftclip has"),
    ("lr_scheduler: polynomial\n", "lr_scheduler", "does not have"),
    ("lora_target_modules: '(q|v_proj'\n", "lora_target_modules", "not a valid regular expression"),
    ("warmup_ratio: 0.1\nwarmup_steps: 5\n", "warmup_ratio", "keep one"),
    ("saves_per_epoch: 2\nsave_steps: 5\n", "saves_per_epoch", "keep one"),
    ("min_lr_ratio: 0.1\nlr_scheduler: linear\n", "min_lr_ratio", "cosine"),
    ("dataset_prepared_path: a\ndataset_cache_dir: b\n", "", "both given"),
])
def test_refused_values_are_named(extra, key, text):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BASE + extra)
    assert any(problem.key.startswith(key) and text in problem.message for problem in caught.value.problems), caught.value


def test_regex_targets_and_alias():
    recipe = parse_recipe(BASE + "adapter: lora\nlora_target_modules: 'model.layers.[\\d]+.self_attn.(q|v)_proj'\n"
                                 "dataset_prepared_path: prepared\n")
    assert recipe.target_modules == r"model.layers.[\d]+.self_attn.(q|v)_proj"
    assert recipe.dataset_cache_dir == "prepared"


def test_schedule_steps_follow_axolotl():
    recipe = parse_recipe(BASE + "warmup_ratio: 0.1\nsaves_per_epoch: 2\nevals_per_epoch: 4\nnum_epochs: 2\n"
                                 "val_set_size: 0.1\n")
    schedule = schedule_steps(recipe, total_steps=95)
    assert (schedule.warmup_steps, schedule.save_steps, schedule.eval_steps) == (9, 24, 12)
    resolved = resolve_schedule(recipe, 95)
    assert (resolved.save_steps, resolved.eval_steps, resolved.warmup_ratio) == (24, 12, 0.1)
    no_eval = parse_recipe(BASE + "evals_per_epoch: 4\n")  # no held-out set: Axolotl skips it too
    assert schedule_steps(no_eval, 100).eval_steps is None


def test_scheduler_uses_ratio_warmup_and_min_lr():
    from ftclip.optim import build_optimizer, build_scheduler

    recipe = parse_recipe(BASE + "warmup_ratio: 0.2\nmin_lr_ratio: 0.1\nlearning_rate: 1.0\noptimizer: adamw_torch\n")
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(recipe, [parameter])
    scheduler = build_scheduler(recipe, optimizer, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5) and rates[2] == pytest.approx(1.0)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)  # decays to min_lr_ratio × lr, not 0


def test_adam_settings_reach_the_optimizer():
    from ftclip.optim import build_optimizer

    recipe = parse_recipe(BASE + "adam_beta2: 0.95\nadam_epsilon: 1.0e-5\noptimizer: adamw_torch\n")
    group = build_optimizer(recipe, [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-5


def test_lora_model_dir_continues_an_adapter(tmp_path, make_recipe):
    from ftclip.modeling import load_model

    first = load_recipe(make_recipe(lora_target_modules=r".*\.(q|v)_proj"))
    model = load_model(first, torch.device("cpu"))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)  # the regex reached peft
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.25)
    model.save_pretrained(tmp_path / "adapter")
    second = load_recipe(make_recipe("second.yaml", lora_model_dir=str(tmp_path / "adapter")))
    continued = load_model(second, torch.device("cpu"))
    trained = {name: p for name, p in continued.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(torch.all(p == 0.25) for name, p in trained.items() if "lora_B" in name)
    with pytest.raises(Exception, match="adapter_config.json"):
        load_model(load_recipe(make_recipe("third.yaml", lora_model_dir=str(tmp_path))), torch.device("cpu"))


def test_saves_per_epoch_and_resume_from_checkpoint_in_a_run(tmp_path, make_recipe):
    from ftclip.train import train

    recipe_path = make_recipe(max_steps=6, saves_per_epoch=2, warmup_ratio=0.5, lr_scheduler="linear")
    result = train(load_recipe(recipe_path))
    checkpoints = sorted(p.name for p in (result.output_dir / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-3", "step-6"]
    assert result.records[0]["lr"] == pytest.approx(3e-3 / 3)  # warmup: int(0.5 × 6) = 3 steps
    again = make_recipe("again.yaml", max_steps=6, saves_per_epoch=2, warmup_ratio=0.5, lr_scheduler="linear",
                        resume_from_checkpoint=str(result.output_dir / "checkpoints" / "step-3"))
    done = runner.invoke(app, ["train", str(again)])
    assert done.exit_code == 0, done.output
    assert "resumed from" in done.output and "(step 3 of 6)" in done.output


# ---------------------------------------------------------------- validate and the README


@pytest.mark.parametrize("key, value", [("strict", "false"), ("tokenizer_type", "AutoTokenizer"),
                                        ("wandb_watch", "gradients")])
def test_a_file_with_axolotl_keys_is_read_through_the_importer(tmp_path, key, value):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + f"{key}: {value}\n")
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(path)  # the recipe alone knows nothing of Axolotl
    recipe = read_recipe(path)  # what every command reads: the importer converts it in memory
    assert key in [dropped for dropped, _ in recipe._imported.dropped]
    assert recipe.lora_dropout == 0.05 and recipe.adapter is None  # no adapter: Axolotl's LoRA default is not added


def test_what_the_importer_refuses_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + "process_reward_model: true\n")
    with pytest.raises(RecipeError) as caught:
        read_recipe(path)
    [problem] = caught.value.problems
    assert (problem.key, problem.line) == ("process_reward_model", 5)
    assert problem.message.startswith("Axolotl key `process_reward_model`: not supported")


def test_a_typo_stays_a_typo_in_an_axolotl_config_too(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + "strict: false\nlearning_rat: 0.1\n")
    with pytest.raises(RecipeError) as caught:
        read_recipe(path)
    [problem] = caught.value.problems
    assert problem.key == "learning_rat" and "did you mean 'learning_rate'" in problem.message and problem.line == 6


def test_axolotl_keys_ftclip_has_validate():
    recipe = parse_recipe(BASE + "tf32: true\nwarmup_ratio: 0.1\nsaves_per_epoch: 1\nevals_per_epoch: 4\n"
                                 "lora_model_dir:\nresume_from_checkpoint:\ngradient_checkpointing_kwargs:\n"
                                 "  use_reentrant: false\n")
    assert recipe.tf32 is True and recipe.warmup_ratio == 0.1


def test_every_table_rule_is_consistent():
    for key, rule in AXOLOTL_KEYS.items():
        assert rule.kind in ("same", "map", "drop", "refuse"), key
        if rule.kind in ("drop", "refuse"):
            assert rule.why, key


def test_docs_axolotl_table_is_current():
    assert mapping_markdown() in (REPO / "docs" / "axolotl.md").read_text(), (
        "docs/axolotl.md's key table is stale: run `python -m ftclip.reference` (or `make docs`) and commit the result"
    )



def test_same_named_configs_do_not_overwrite_each_other(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "qlora.yml").write_text(BASE + f"learning_rate: {0.1 if folder == 'a' else 0.2}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["import-axolotl", str(tmp_path / "a" / "qlora.yml"), str(tmp_path / "b" / "qlora.yml"),
                                 "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert load_recipe(out / "a__qlora.ftclip.yaml").learning_rate == 0.1
    assert load_recipe(out / "b__qlora.ftclip.yaml").learning_rate == 0.2


def test_local_paths_are_rebased_onto_the_written_recipe(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "axolotl.yml").write_text("base_model: org/model\ndatasets:\n  - path: data/train.jsonl\n    type: alpaca\n")
    monkeypatch.chdir(tmp_path)  # Axolotl reads local paths from the working directory; ftclip from the recipe's folder
    result = runner.invoke(app, ["import-axolotl", "axolotl.yml", "-o", "recipes/imported.yaml"])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(tmp_path / "recipes" / "imported.yaml")
    assert recipe.datasets[0].path == "../data/train.jsonl"
    assert recipe.base_model == "org/model"  # a hub id stays as it is


@pytest.mark.parametrize("extra, strategy", [
    ("deepspeed: deepspeed_configs/zero3_bf16.json\n", "fsdp"),
    ("deepspeed: deepspeed_configs/zero2.json\n", "ddp"),
    ("fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\nfsdp_version: 2\n", "fsdp"),
    ("fsdp_config:\n  sharding_strategy: NO_SHARD\n", "ddp"),
    ("deepspeed:\nfsdp:\nfsdp_config:\n", "ddp"),  # empty: the default
])
def test_recipe_takes_axolotl_distributed_keys(extra, strategy, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + extra)
    assert read_recipe(path).distributed.strategy == strategy


def test_ddp_timeout_becomes_the_distributed_timeout_beside_the_strategy(tmp_path):
    config = tmp_path / "axolotl.yml"
    config.write_text(BASE + "ddp_timeout: 7200\ndeepspeed: deepspeed_configs/zero3_bf16.json\n")
    distributed = parse_recipe(import_config(config).text).distributed
    assert (distributed.timeout, distributed.strategy) == (7200, "fsdp")


def test_recipe_refuses_an_unreadable_deepspeed_setting(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + "deepspeed: my_settings.json\n")
    with pytest.raises(RecipeError) as caught:
        read_recipe(path)
    [problem] = caught.value.problems
    assert (problem.key, problem.line) == ("deepspeed", 5) and "ZeRO stage" in problem.message


def test_a_multimodal_config_imports_as_a_vision_language_recipe(tmp_path):
    """Axolotl's LLaVA example: processor_type and the language-model LoRA regex carry over; its no-op keys drop."""
    result = import_config(CORPUS_DIR / "llava__lora-7b.yaml")
    assert result.ok
    recipe = parse_recipe(result.text)
    assert recipe.processor_type == "AutoProcessor" and recipe.chat_template == "llama3_2_vision"
    assert recipe.lora_target_modules.startswith("language_model.model.layers")
    assert not recipe.sample_packing and recipe.datasets[0].type == "chat"


def test_a_vision_model_type_is_dropped_with_processor_type_and_refused_without():
    from ftclip.axolotl.importer import import_mapping

    config = {"base_model": "org/vlm", "model_type": "AutoModelForImageTextToText",
              "datasets": [{"path": "d.jsonl", "type": "chat_template"}]}
    vision = import_mapping({**config, "processor_type": "AutoProcessor"})
    assert vision.ok and "model_type" in dict(vision.dropped)
    text_only = import_mapping(config)
    assert not text_only.ok and "model_type" in dict(text_only.refused)
