"""The Axolotl importer on configs as people commit them (tests/fixtures/axolotl_wild, sources in SOURCES.md),
and its in-memory entry point."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftclip.axolotl import import_config, import_mapping
from ftclip.recipe import parse_recipe

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO / "tests" / "fixtures" / "axolotl_wild"
CORPUS = sorted(path for path in CORPUS_DIR.iterdir() if path.suffix in (".yml", ".yaml"))


def test_import_mapping_converts_a_parsed_config_in_memory(tmp_path):
    config = {"base_model": "org/model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "learning_rate": "2e-4", "adapter": "lora", "lora_target_linear": True}
    before = set(tmp_path.iterdir())
    result = import_mapping(config, tmp_path / "axolotl.yml")
    assert result.ok and set(tmp_path.iterdir()) == before  # nothing written
    assert result.recipe["learning_rate"] == 2e-4 and result.recipe["datasets"] == [{"path": "data.jsonl", "type": "alpaca"}]
    assert parse_recipe(result.text).learning_rate == 2e-4
    assert ("learning_rate", "learning_rate: 0.0002", "") in result.mapped
    # The same answer as importing the file.
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(config))
    assert import_config(path).text == result.text


def test_import_mapping_reports_refusals_without_a_recipe(tmp_path):
    result = import_mapping({"base_model": "org/model", "datasets": [{"path": "d.jsonl", "type": "alpaca"}],
                             "rl": "dpo"}, tmp_path / "axolotl.yml")
    assert not result.ok and result.recipe is None and "rl" in dict(result.refused)
    assert import_mapping(["not", "a", "mapping"]).problems == ["not a mapping of keys (an Axolotl config is one)"]
