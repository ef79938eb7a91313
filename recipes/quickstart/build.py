"""Rebuild the quickstart's tiny model, tokenizer and data (deterministic; run from the repo root):

    python recipes/quickstart/build.py

The model is a 4-layer Llama (~0.9 M parameters), initialized randomly and then "pretrained" by ftclip
itself (full fine-tuning on plain sentences stating the facts), so it is a base model that knows the
facts but not the instruction format. The quickstart's LoRA then teaches the format on a synthetic
instruction set (capitals, opposites, plurals, counting, colors in French). Everything is saved with
`save_pretrained`, so ftclip loads it through the same `from_pretrained` path as a real checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Russia": "Moscow", "Turkey": "Ankara",
    "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
    "open": "closed", "full": "empty", "high": "low", "strong": "weak", "hard": "soft", "young": "old",
    "rich": "poor", "wet": "dry", "loud": "quiet", "near": "far", "thick": "thin", "clean": "dirty",
    "first": "last", "true": "false", "up": "down", "left": "right", "in": "out", "win": "lose",
}
PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "city": "cities", "baby": "babies", "knife": "knives", "leaf": "leaves", "man": "men",
    "woman": "women", "bus": "buses", "wish": "wishes", "story": "stories", "sheep": "sheep", "goose": "geese",
}
COLORS = {
    "red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune", "black": "noir", "white": "blanc",
    "pink": "rose", "gray": "gris", "orange": "orange", "purple": "violet", "brown": "marron",
}


def make_records(rng: random.Random) -> list[dict]:
    records = []
    for country, capital in CAPITALS.items():
        for question in ("What is the capital of {}?", "Name the capital city of {}."):
            records.append({"instruction": question.format(country), "output": f"The capital of {country} is {capital}."})
    for word, opposite in OPPOSITES.items():
        records.append({"instruction": "Give the opposite of the word.", "input": word, "output": opposite})
        records.append({"instruction": "Give the opposite of the word.", "input": opposite, "output": word})
    for word, plural in PLURALS.items():
        records.append({"instruction": "Write the plural of the word.", "input": word, "output": plural})
    for color, french in COLORS.items():
        records.append({"instruction": "Translate the color into French.", "input": color, "output": french})
    for _ in range(120):
        start = rng.randint(1, 40)
        stop = start + rng.randint(2, 7)
        records.append({"instruction": f"Count from {start} to {stop}.",
                        "output": ", ".join(str(n) for n in range(start, stop + 1))})
    rng.shuffle(records)
    return records


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    return wrapped


def build_model(tokenizer, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def fact_sentences(rng: random.Random) -> list[str]:
    facts = []
    for country, capital in CAPITALS.items():
        facts += [f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}."]
    for word, opposite in OPPOSITES.items():
        facts += [f"The opposite of {word} is {opposite}.", f"{word.capitalize()} and {opposite} are opposites."]
    for word, plural in PLURALS.items():
        facts.append(f"One {word}, two {plural}.")
    for color, french in COLORS.items():
        facts.append(f"The French word for {color} is {french}.")
    for start in range(1, 45):
        facts.append(", ".join(str(n) for n in range(start, start + rng.randint(3, 9))))
    return facts


def question_answer_prose() -> list[str]:
    """Questions answered in plain prose, as a real base model has read them on the web: they teach the model to
    carry the subject of a question into its answer, which the quickstart's short LoRA cannot teach a 0.9 M model
    from scratch (without them it answered 'What is the capital of China?' with another country's capital)."""
    prose = []
    for country, capital in CAPITALS.items():
        prose += [f"Which city is the capital of {country}? The capital of {country} is {capital}.",
                  f"Q: Where is the capital of {country}? A: The capital of {country} is {capital}."]
    for word, opposite in OPPOSITES.items():
        prose.append(f"What is the opposite of {word}? The opposite of {word} is {opposite}.")
    return prose


def pretrain(random_base: Path, corpus: Path, workdir: Path) -> Path:
    """Full fine-tune of the random model on the fact sentences, with ftclip's own loop."""
    from rich.console import Console

    from ftclip.recipe import Recipe
    from ftclip.train import train

    recipe = Recipe(
        base_model=str(random_base), datasets=[{"path": str(corpus), "type": "completion"}], sequence_len=64,
        micro_batch_size=16, num_epochs=60, learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=20,
        output_dir=str(workdir), logging_steps=50, seed=0,
    )
    return train(recipe, Console(quiet=True)).artifact


def main() -> None:
    from ftclip.data.records import ALPACA_WITH_INPUT

    records = make_records(random.Random(0))
    with open(HERE / "data.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    facts = fact_sentences(random.Random(1))
    texts = [ALPACA_WITH_INPUT.format(**{"input": "", **r}) + r["output"] for r in records] * 4 + facts * 4
    folder = HERE / "tiny-llama"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "facts.jsonl"
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in facts + question_answer_prose()))
        tokenizer = build_tokenizer(texts, scratch / "random")
        build_model(tokenizer, scratch / "random")
        pretrained = pretrain(scratch / "random", corpus, scratch / "pretrain")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("ftclip_recipe.yaml"))
    print(f"{len(records)} records, {len(facts) + len(question_answer_prose())} pretraining sentences, vocab {len(tokenizer)}, model in {folder}")


if __name__ == "__main__":
    main()
