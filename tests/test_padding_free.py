"""Padding-free packed batches: one flattened row per micro-batch whose examples never see each other, for the
attention kernels that run on the CPU (sdpa, eager); flash-attn's varlen path on CUDA when installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ftclip.loss import causal_lm_loss
from ftclip.modeling import packing_problem
from ftclip.padding_free import VARLEN_SDPA, collate_flattened, use_varlen_sdpa

VOCAB = 101


def tiny_llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa" if attn_implementation == "sdpa-varlen" else attn_implementation)
    config.use_cache = False  # as load_model sets it
    model = LlamaForCausalLM(config).float().eval()
    if attn_implementation == "sdpa-varlen":  # what load_model picks for sdpa with sample_packing
        model.set_attn_implementation(use_varlen_sdpa(config))
    return model


def example(seed: int, length: int, prompt: int = 3):
    ids = np.random.default_rng(seed).integers(0, VOCAB, length).astype(np.int64)
    labels = ids.copy()
    labels[:prompt] = -100
    return ids, labels


ROWS = [[example(1, 9), example(2, 17)], [example(3, 5), example(4, 12), example(5, 7)]]


def test_collate_flattened_gives_one_row_with_restarting_positions_and_cumulative_lengths():
    batch = collate_flattened(ROWS, pad_token_id=0)
    lengths = [9, 17, 5, 12, 7]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert batch["cu_seq_lens_q"].tolist() == [0, 9, 26, 31, 43, 50]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 17
    assert batch["input_ids"][0].tolist() == np.concatenate([ids for row in ROWS for ids, _ in row]).tolist()
    # An example's first token is never a target (it would be predicted from the previous example).
    labels = batch["labels"][0]
    assert all(labels[start] == -100 for start in (0, 9, 26, 31, 43))
    assert labels[29].item() == ROWS[1][0][1][3]


def test_collate_flattened_pads_to_a_multiple_as_a_segment_of_its_own():
    batch = collate_flattened(ROWS, pad_token_id=7, pad_to_multiple_of=16)
    assert batch["input_ids"].shape[1] == 64
    assert batch["input_ids"][0, 50:].tolist() == [7] * 14
    assert (batch["labels"][0, 50:] == -100).all()
    assert batch["position_ids"][0, 50:].tolist() == list(range(14))
    assert batch["cu_seq_lens_q"].tolist()[-2:] == [50, 64]


def alone(model, ids: np.ndarray) -> torch.Tensor:
    return model(input_ids=torch.from_numpy(ids).unsqueeze(0)).logits[0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "sdpa-varlen"])
@torch.no_grad()
def test_each_packed_example_has_its_unpacked_logits_and_loss(attn_implementation):
    model = tiny_llama(attn_implementation)
    batch = collate_flattened(ROWS, pad_token_id=0)
    packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    examples = [e for row in ROWS for e in row]
    for (ids, labels), start, end in zip(examples, bounds, bounds[1:]):
        torch.testing.assert_close(packed[start:end], alone(model, ids), rtol=1e-5, atol=1e-5)
    # Per example, the loss of the flattened batch (chunked, through ftclip's loss) is the unpacked loss.
    for (ids, labels), start, end in zip(examples, bounds, bounds[1:]):
        only_this = batch["labels"].clone()
        only_this[:, :start] = -100
        only_this[:, end:] = -100
        packed_loss = causal_lm_loss(model, {**batch, "labels": only_this}, chunked=True)
        single = {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None]}
        torch.testing.assert_close(packed_loss, model(**single).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "sdpa-varlen"])
@torch.no_grad()
def test_perturbing_one_example_leaves_the_others_logits_unchanged(attn_implementation):
    model = tiny_llama(attn_implementation)
    before = model(**{k: v for k, v in collate_flattened(ROWS, 0).items() if k != "labels"}).logits[0]
    changed = [list(row) for row in ROWS]
    ids, labels = changed[0][1]
    changed[0][1] = ((ids + 1) % VOCAB, labels)  # the second example, every token different
    after = model(**{k: v for k, v in collate_flattened(changed, 0).items() if k != "labels"}).logits[0]
    assert not torch.allclose(after[9:26], before[9:26])
    torch.testing.assert_close(after[:9], before[:9], rtol=0, atol=0)
    torch.testing.assert_close(after[26:], before[26:], rtol=0, atol=0)


@torch.no_grad()
def test_varlen_sdpa_builds_no_mask_and_also_separates_unflattened_packed_rows(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = tiny_llama("sdpa-varlen")
    masks = []
    real = sdpa.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask)
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    batch = collate_flattened(ROWS, 0)
    flattened = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    assert masks and all(mask is None for mask in masks)  # one causal call per example, no T×T tensor
    assert len(masks) == 5 * 2  # five examples, two layers
    # The plain collate's [B, L] rows with restarting position ids (no cu_seq_lens): separated as well.
    padded_rows = torch.zeros(2, 26, dtype=torch.long)
    positions = torch.zeros(2, 26, dtype=torch.long)
    for row, examples in enumerate(ROWS):
        ids = np.concatenate([e[0] for e in examples])
        padded_rows[row, :len(ids)] = torch.from_numpy(ids)
        lengths = [len(e[0]) for e in examples] + ([26 - len(ids)] if len(ids) < 26 else [])
        positions[row] = torch.cat([torch.arange(n) for n in lengths])
    rows = model(input_ids=padded_rows, position_ids=positions).logits
    torch.testing.assert_close(rows[0, :26], flattened[:26], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1, :24], flattened[26:], rtol=1e-5, atol=1e-5)


def test_load_model_uses_varlen_sdpa_for_packed_sdpa_runs(make_recipe):
    from ftclip.modeling import load_model
    from ftclip.recipe import load_recipe

    path = make_recipe(sample_packing=True)
    assert load_model(load_recipe(path), torch.device("cpu")).config._attn_implementation == VARLEN_SDPA
    path = make_recipe(sample_packing=False)
    assert load_model(load_recipe(path), torch.device("cpu")).config._attn_implementation == "sdpa"


def test_packing_is_refused_for_layers_that_ignore_example_boundaries():
    from transformers import AutoConfig, LlamaConfig

    assert packing_problem(LlamaConfig()) is None
    mamba = packing_problem(AutoConfig.for_model("mamba"))
    assert "linear_attention" in mamba and "sample_packing: false" in mamba
    hybrid = AutoConfig.for_model("qwen3_next")
    assert "linear_attention" in packing_problem(hybrid)
    assert "rwkv" in packing_problem({"model_type": "rwkv"})  # a config.json without layer_types


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs CUDA and flash-attn")
@torch.no_grad()
def test_flash_attention_varlen_keeps_examples_apart():
    model = tiny_llama("flash_attention_2").to("cuda", torch.bfloat16)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate_flattened(ROWS, 0).items() if k != "labels"}
    packed = model(**batch).logits[0].float()
    bounds = batch["cu_seq_lens_q"].tolist()
    for (ids, _), start, end in zip([e for row in ROWS for e in row], bounds, bounds[1:]):
        single = model(input_ids=torch.from_numpy(ids)[None].cuda()).logits[0].float()
        torch.testing.assert_close(packed[start:end], single, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- validate and train refuse what cannot run here


def validate_json(path):
    import json

    from typer.testing import CliRunner

    from ftclip.cli import app

    result = CliRunner().invoke(app, ["validate", "--json", str(path)])
    return result.exit_code, {(p["key"], p["message"]) for p in json.loads(result.output)[0]["problems"]}


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn runs here")
def test_validate_refuses_flash_attention_without_the_package_or_cuda(make_recipe):
    code, problems = validate_json(make_recipe(attn_implementation="flash_attention_2", device="cpu"))
    assert code == 2
    messages = [message for key, message in problems if key == "attn_implementation"]
    assert any("runs on CUDA only, and the recipe sets device: cpu" in m for m in messages)
    assert any("bf16" in m for m in messages)  # fp32 weights: flash-attn has no fp32 kernel
    if importlib.util.find_spec("flash_attn") is None:
        assert any("flash-attn package, which is not installed" in m for m in messages)


def test_validate_refuses_packing_for_a_state_space_model(make_recipe, tmp_path):
    import json

    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    code, problems = validate_json(make_recipe(base_model=str(mamba), sample_packing=True))
    assert code == 2
    assert any(key == "sample_packing" and "mamba" in message for key, message in problems)
    code, problems = validate_json(make_recipe(base_model=str(mamba), sample_packing=False))
    assert not any(key == "sample_packing" for key, _ in problems)


def test_validate_refuses_qlora_under_fsdp_on_the_cpu(make_recipe):
    code, problems = validate_json(make_recipe(adapter="qlora", device="cpu", distributed={"strategy": "fsdp"}))
    assert code == 2
    assert any(key == "distributed" and "QLoRA" in message and "needs CUDA" in message for key, message in problems)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_the_model_loads_with_the_recipes_attention(make_recipe, attn_implementation):
    from ftclip.modeling import load_model
    from ftclip.recipe import load_recipe

    path = make_recipe(attn_implementation=attn_implementation)
    model = load_model(load_recipe(path), torch.device("cpu"))
    assert model.config._attn_implementation == attn_implementation


def test_train_refuses_a_kernel_this_machine_lacks_with_an_ftclip_error(make_recipe):
    from ftclip.errors import ModelError
    from ftclip.modeling import load_model
    from ftclip.recipe import load_recipe

    path = make_recipe(attn_implementation="flash_attention_2", bf16=True)
    with pytest.raises(ModelError, match="attn_implementation: flash_attention_2"):
        load_model(load_recipe(path), torch.device("cpu"))
