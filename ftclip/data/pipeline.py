"""The data pipeline behind `ftclip.data.prepare`: `prepare(recipe)` runs
load (sources) → tokenize (Dataset.map, batched, in parallel) → cache (memory-mapped Arrow) → split → pack
→ batches, and returns training and held-out rows. Under torchrun the local rank 0 of each node builds the cache on
that node's disk while the node's other ranks wait (a node whose cache folder another node shares waits for that
node instead); then every rank opens the memory-mapped files and all ranks check they hold the same tokens."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

import ftclip.data.vision as vision
from ftclip.data.batches import Rows
from ftclip.data.cache import (
    MANIFEST,
    cache_dir,
    entry_key,
    publish,
    read_manifest,
    staging_folder,
    tokenizer_digest,
    write_atomically,
    writer_id,
)
from ftclip.data.chat import check_skipped
from ftclip.data.examples import TokenizedExamples, open_shards, split_indices, without_duplicates
from ftclip.data.pack import PACKING_VERSION, PackingStats, pack_best_fit
from ftclip.data.prepared import PreparedData, cached_tokens, num_processes
from ftclip.data.prepared import first_problem as _first_problem
from ftclip.data.sources import Source
from ftclip.data.tokenize import TokenizeSettings, check_chat_template, tokenize_batch
from ftclip.errors import DataError
from ftclip.nodes import cache_builders
from ftclip.recipe import Recipe


def _spec_key(spec) -> dict:
    """A dataset spec as the cache key reads it. `field` joined the spec later: it is left out while unset, so
    cache entries made before it keep their keys."""
    return spec.model_dump(mode="json", exclude={"path"} | ({"field"} if spec.field is None else set()))


def _key(recipe: Recipe, sources: list[Source], identities: list[str], tokenizer) -> str:
    parts = {
        "datasets": [(identity, _spec_key(source.spec)) for source, identity in zip(sources, identities)],
        "tokenizer": tokenizer_digest(tokenizer),
        "sequence_len": recipe.sequence_len,
        "train_on_inputs": recipe.train_on_inputs,
    }
    if vision.is_vision(recipe):  # the expanded image placeholders depend on the processor's settings
        parts["vision"] = vision.processor_fingerprint(tokenizer.ftclip_processor, vision.ImageSettings.from_recipe(recipe))
    return entry_key(parts)


def _skipped_note(mapped, source: Source, check=check_skipped) -> list[str]:
    """Chat records the template could not mask: a note, or a stop when so many that the template is wrong."""
    import pyarrow.compute as pc

    column = mapped.data.column("skipped")
    skipped = len(column) - column.null_count
    if not skipped:
        return []
    reasons = pc.drop_null(column).slice(0, 3).to_pylist()
    note = check(skipped, len(column), reasons, source.label)
    return [note] if note else []


def _build(recipe: Recipe, sources: list[Source], datasets_opened: list, tokenizer, root: Path, key: str) -> tuple[Path, int]:
    import datasets

    staging = staging_folder(root, key)
    settings = [TokenizeSettings(s.spec, recipe.sequence_len, recipe.train_on_inputs) for s in sources]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32")),
        "trained": datasets.Value("int32"), "problem": datasets.Value("string"), "skipped": datasets.Value("string"),
    })
    images = vision.is_vision(recipe)
    if images:  # image chats: each example's image references, opened per batch
        vision.check_processor(tokenizer)
        features["images"] = datasets.List({"path": datasets.Value("string"), "bytes": datasets.Value("binary")})
    records, shards, kept_counts, notes = 0, [], [], []
    for index, (source, dataset, setting) in enumerate(zip(sources, datasets_opened, settings)):
        if len(dataset) == 0:
            raise DataError(f"{source.label}: the dataset is empty")
        check_chat_template(tokenizer, setting.kind)
        processes = num_processes(recipe, len(dataset))
        function = functools.partial(tokenize_batch, tokenizer=tokenizer, settings=setting)
        if images:  # records are numbered in the messages about their images
            dataset = vision.undecoded_images(dataset)
            function = functools.partial(vision.tokenize_batch, tokenizer=tokenizer,
                                         settings=vision.tokenize_settings(source, setting, recipe))
        environ = os.environ
        try:
            mapped = dataset.map(
                function, with_indices=images,
                batched=True, batch_size=1000, num_proc=processes if processes > 1 else None,
                remove_columns=dataset.column_names, features=features,
                cache_file_name=str(staging / f"d{index}-tokens.arrow"), new_fingerprint=f"{key}-{index}",
                desc=f"tokenizing {Path(source.location).name}",
            )
        finally:
            # With worker processes, datasets swaps os.environ for a deep copy; libraries holding the original
            # (rich reads NO_COLOR from it) would no longer see later changes.
            os.environ = environ
        _first_problem(mapped, source)
        notes += _skipped_note(mapped, source, vision.check_skipped_images if images else check_skipped)
        trained = np.concatenate([chunk.to_numpy() for chunk in mapped.data.column("trained").chunks])
        kept = np.flatnonzero(trained > 0)
        np.save(staging / f"d{index}-kept.npy", kept)
        shards.append([Path(f["filename"]).name for f in mapped.cache_files])
        kept_counts.append(len(kept))
        records += len(dataset)
        del mapped
    if not sum(kept_counts):
        raise DataError("no example has a trained token left after truncation; raise sequence_len")
    entry = publish(staging, root / key, {"format": 2, "shards": shards, "kept": kept_counts, "records": records,
                                          "sources": [s.label for s in sources], "notes": notes})
    return entry, records


def _open(entry: Path, manifest: dict) -> TokenizedExamples:
    tables, kept = open_shards(entry, manifest)
    return TokenizedExamples(tables, kept)


def tokenized_examples(recipe: Recipe, tokenizer, build: bool = True
                       ) -> tuple[TokenizedExamples, Path, dict, bool, int, float]:
    """(examples, cache entry, its manifest, hit, records read, seconds) — from the cache, else tokenized now
    and stored.
    build=False (a rank other than 0) only opens an entry that rank 0 built."""
    return cached_tokens(
        recipe, build, lambda sources, identities: _key(recipe, sources, identities, tokenizer),
        lambda sources, datasets, root, key: _build(recipe, sources, datasets, tokenizer, root, key), _open)


def _packing(recipe: Recipe, examples: TokenizedExamples, train: np.ndarray, entry: Path) -> tuple[Rows, PackingStats]:
    """Best-fit decreasing over the training examples, cached beside the tokens (keyed by the split)."""
    lengths = examples.lengths[train]
    split = {"packing": PACKING_VERSION, "capacity": recipe.sequence_len, "val": recipe.val_set_size, "seed": recipe.seed,
             "deduplicated": recipe.dataset_exact_deduplication}
    name = f"packing-{entry_key(split)}.npz"
    path = entry / name
    try:
        stored = np.load(path)
        offsets, members = stored["offsets"], stored["members"]
    except (OSError, ValueError, KeyError):
        offsets, members = pack_best_fit(lengths, recipe.sequence_len)
        try:
            staging = path.with_name(f".{name}.tmp-{writer_id()}.npz")
            np.savez(staging, offsets=offsets, members=members)
            os.replace(staging, path)
        except OSError:
            pass  # the next run packs again
    stats = PackingStats(len(train), len(offsets) - 1, int(lengths.sum()), recipe.sequence_len)
    return Rows(examples, offsets, train[members], packed=True), stats


def prepare(recipe: Recipe, tokenizer, dist=None) -> PreparedData:
    """Tokenized, split and (with sample_packing) packed data. Under torchrun the local rank 0 of each node prepares
    the cache while the node's other ranks wait, and where nodes share the cache folder the first of them builds
    it for all (ftclip.nodes.cache_builders: a marker check, not a race); an error there stops every rank. Then
    every rank opens the entry, and all ranks compare its key and a digest of its tokens: a node with other data
    files (or another tokenizer) stops the run, named, before anything trains on it."""
    if dist is None or not dist.enabled:
        return _prepare(recipe, tokenizer, build=True)
    builder = cache_builders(dist, cache_dir(recipe))[dist.node_rank]
    builds = dist.local_rank == 0 and builder == dist.node_rank
    prepared, failure = None, None
    if builds:
        try:
            prepared = _prepare(recipe, tokenizer, build=True, dist=dist)
        except Exception as error:  # whatever it is, the waiting ranks must hear of it, not hang
            failure = error
    # Doubles as the barrier: every node's builder has finished.
    _stop_on_failure(dist, dist.gather((dist.node, dist.rank, _message(failure))), failure)
    if not builds:
        try:
            prepared = _prepare(recipe, tokenizer, build=False, dist=dist)
        except Exception as error:  # reported to every rank below, as the builders' are
            failure = error
    key = prepared.cache.name if prepared else getattr(failure, "key", None)
    digest = prepared.tokens_digest if prepared else None
    reports = dist.gather((dist.node, dist.rank, _message(failure), key, digest))
    _check_same_tokens(reports)
    _stop_on_failure(dist, [report[:3] for report in reports], failure)
    return prepared


def _message(failure: Exception | None) -> str | None:
    return None if failure is None else str(failure) or type(failure).__name__


def _stop_on_failure(dist, reports: list[tuple], own: Exception | None) -> None:
    """Stop every rank where any failed: the failed rank with its own error, the others naming it."""
    if own is not None:
        raise own
    failed = [(node, rank, message) for node, rank, message in reports if message is not None]
    if failed:
        node, rank, message = failed[0]
        raise DataError(f"{node}, rank {rank}, could not prepare the data: {message}")


def _check_same_tokens(reports: list[tuple]) -> None:
    """Every rank must train on the same tokens: the same cache key (the data files' contents, the tokenizer and
    the settings that shape tokens) and, within it, the same token digest."""
    def nodes_by(index: int) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for report in reports:
            if report[index] is not None and report[0] not in grouped.setdefault(report[index], []):
                grouped[report[index]].append(report[0])
        return grouped

    keys = nodes_by(3)
    if len(keys) > 1:
        listing = "; ".join(f"{', '.join(nodes)}: key {key}" for key, nodes in keys.items())
        raise DataError(
            f"the nodes would train on different data ({listing}). The key covers the dataset files' contents, the "
            "tokenizer and the settings that shape the tokens: give every node the same data files and tokenizer "
            "(a shared folder, or identical copies at the recipe's paths)."
        )
    digests = nodes_by(4)
    if len(digests) > 1:
        listing = "; ".join(f"{', '.join(nodes)}: {digest[:16]}" for digest, nodes in digests.items())
        raise DataError(
            f"the same data and tokenizer gave other tokens on other nodes (token digests: {listing}). Run the same "
            "versions of ftclip, transformers and tokenizers on every node."
        )


def _prepare(recipe: Recipe, tokenizer, build: bool, dist=None) -> PreparedData:
    if recipe.rl or recipe.reward_model:  # preference pairs / KTO completions: their own rows (data/preference.py)
        from ftclip.data.preference import prepare_preference

        prepared = prepare_preference(recipe, tokenizer, build)
        if dist is not None and dist.enabled:
            prepared.tokens_digest = _tokens_digest(prepared.examples, prepared.cache, build)
        return prepared
    examples, entry, manifest, hit, records, seconds = tokenized_examples(recipe, tokenizer, build)
    digest = _tokens_digest(examples, entry, store=build) if dist is not None and dist.enabled else None
    train, val = split_indices(len(examples), recipe.val_set_size, recipe.seed)
    notes = list(manifest.get("notes", []))
    test = None
    if recipe.test_datasets:  # evaluated on, never trained on: tokenized (and cached) as datasets are, on their own
        test_recipe = recipe.model_copy(update={"datasets": recipe.test_datasets})
        test, _, test_manifest, test_hit, test_records, test_seconds = tokenized_examples(test_recipe, tokenizer, build)
        notes += [f"test_datasets: {note}" for note in test_manifest.get("notes", [])]
        val = np.arange(len(test), dtype=np.int64)
        hit, records, seconds = hit and test_hit, records + test_records, seconds + test_seconds
    if recipe.dataset_exact_deduplication:
        unique_train, unique_val = without_duplicates(examples, train, val, held_out_examples=test)
        held_out = "test_datasets" if test is not None else "held-out"
        notes.append(f"dataset_exact_deduplication: dropped {len(train) - len(unique_train):,} repeated training and "
                     f"{len(val) - len(unique_val):,} repeated {held_out} examples")
        train, val = unique_train, unique_val
    packing = None
    if recipe.sample_packing:
        train_rows, packing = _packing(recipe, examples, train, entry)
    else:
        train_rows = Rows.single(examples, train)
    val_rows = Rows.single(test if test is not None else examples, val)
    if vision.is_vision(recipe):  # rows that load their images per batch, in worker processes
        from ftclip.data.vision_batches import image_rows

        train_rows, val_rows = image_rows(recipe, tokenizer, train_rows, val_rows, dist)
        notes += vision.recipe_notes(recipe, tokenizer)
    return PreparedData(examples, train_rows, val_rows, packing, entry, hit, records, seconds, notes, test=test,
                        tokens_digest=digest)


def _tokens_digest(examples, entry: Path, store: bool) -> str:
    """The digest ranks compare, kept in the entry's manifest by the rank that builds (computed once per entry)."""
    manifest = read_manifest(entry) or {}
    if "tokens_sha256" in manifest:
        return manifest["tokens_sha256"]
    digest = examples.digest()
    if store and manifest:
        try:
            write_atomically(entry / MANIFEST, json.dumps({**manifest, "tokens_sha256": digest}, indent=1).encode())
        except OSError:
            pass  # the next run computes it again
    return digest
