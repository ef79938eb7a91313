"""The data stage: load (sources) → tokenize → cache → pack → batches, with one entry point, `prepare(recipe)`,
used by both `train` and `preprocess`. Importing this package stays light (validate uses `check_datasets`
without torch, transformers or datasets); the pipeline loads on first use of `prepare`."""

from __future__ import annotations

from ftclip.data.records import IGNORE_INDEX
from ftclip.data.sources import check_datasets

__all__ = ["IGNORE_INDEX", "PreparedData", "check_datasets", "prepare"]


def __getattr__(name: str):
    if name in ("prepare", "PreparedData"):
        from ftclip.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ftclip.data' has no attribute {name!r}")
