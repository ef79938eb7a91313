"""Where a dataset comes from: a local file, a local folder, or a hub dataset id, and opening it as an Arrow
`datasets.Dataset` (memory-mapped, not loaded into Python objects).

Validate-time checks (`check_source`) import nothing heavy: local .jsonl/.json/.csv files are read record by
record so errors name the record; Arrow and parquet files are checked by their schema; a hub id is checked for
its form and whether the local Hugging Face cache holds it, without network."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftclip.data.records import missing_columns, record_problem
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_HINT = ("pre-download it where there is network (`hf download {id} --repo-type dataset`, or "
            "`python -c \"import datasets; datasets.load_dataset('{id}')\"`) and copy the Hugging Face cache "
            "(~/.cache/huggingface) here, or point `path` at a local file or folder")


@dataclass(frozen=True)
class Source:
    """A resolved `datasets[].path`: kind is file, folder or hub."""

    spec: DatasetSpec
    kind: str
    location: str  # a resolved local path, or the hub id

    @property
    def label(self) -> str:
        return self.location if self.kind != "hub" else f"hub dataset {self.location}"


def resolve_source(spec: DatasetSpec, recipe: Recipe | None) -> Source:
    """A local file or folder when one exists (or the value names a data file); else a hub id. Local paths
    are relative to the recipe's folder (the working directory without a recipe)."""
    local = recipe.input_path(spec.path) if recipe is not None else Path(spec.path).expanduser()
    if local.is_dir():
        return Source(spec, "folder", str(local))
    if local.is_file() or local.suffix in FILE_TYPES or spec.path.startswith((".", "/", "~")):
        if not local.is_file():
            raise DataError(f"{local}: no such dataset file")
        if local.suffix not in FILE_TYPES:
            raise DataError(f"{local}: unsupported file type {local.suffix!r}; use one of {', '.join(FILE_TYPES)}, "
                            "a folder, or a hub dataset id")
        return Source(spec, "file", str(local))
    if HUB_ID.match(spec.path):
        return Source(spec, "hub", spec.path)
    raise DataError(f"{spec.path!r} is neither a local file or folder ({local} does not exist) nor a hub dataset id "
                    "like org/name")


# ---------------------------------------------------------------- the local Hugging Face cache, without imports


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")


def hub_cache_folders(hub_id: str) -> list[Path]:
    """Where the local cache would hold a hub dataset: the hub download cache and datasets' prepared Arrow."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub")
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets")
    org, name = hub_id.split("/")
    candidates = [hub / f"datasets--{org}--{name}", prepared / f"{org}___{name}"]
    return [folder for folder in candidates if folder.is_dir()]


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


# ---------------------------------------------------------------- validate: light checks


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON: {error.msg}") from None
    return records


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    return records


def read_text_records(path: Path) -> list[Any]:
    """Records of a .jsonl, .json or .csv file as Python objects (for exact per-record messages)."""
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return _read_json(path)
        with open(path, encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None


def _arrow_columns(path: Path) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(f"{path}: reading {path.suffix} needs pyarrow (installed with `datasets`)") from None
    try:
        if path.suffix == ".parquet":
            return list(parquet.read_schema(path).names)
        with pa.memory_map(str(path)) as source:
            try:
                return list(pa.ipc.open_stream(source).schema.names)
            except pa.ArrowInvalid:
                return list(pa.ipc.open_file(source).schema.names)
    except Exception as error:  # pyarrow's ArrowInvalid/OSError family for damaged files
        raise DataError(f"{path}: not a readable {path.suffix} file: {error}") from None


def check_records(path: Path, records: list[Any], spec: DatasetSpec, problem_of=record_problem) -> None:
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    for number, record in enumerate(records, start=1):
        problem = problem_of(record, spec)
        if problem:
            raise DataError(f"{path}: record {number}: {problem}")


def check_source(spec: DatasetSpec, recipe: Recipe | None) -> str | None:
    """For `validate`: raise DataError for what is wrong; return a notice for what is fine but worth saying
    (a hub dataset that is not in the local cache)."""
    source = resolve_source(spec, recipe)
    path = Path(source.location)
    if source.kind == "hub":
        if hub_cache_folders(source.location):
            return None
        return (f"{source.location} looks like a hub dataset id and is not in the local Hugging Face cache; "
                "`ftclip train` will download it, or fail offline: " + HUB_HINT.format(id=source.location))
    if source.kind == "folder":
        if not any(path.iterdir()):
            raise DataError(f"{path}: the dataset folder is empty")
        return None
    if spec.split != "train":
        try:
            _file_slices(spec.split, 1_000_000)  # the split's form; its size is known once the file is read
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
    if path.suffix in (".parquet", ".arrow"):
        problem = missing_columns(_arrow_columns(path), spec)
        if problem:
            raise DataError(f"{path}: {problem}")
        return None
    if recipe is not None and recipe.processor_type:  # image chats (ftclip/data/vision.py); images open at train
        from ftclip.data.vision import record_problem as image_chat_problem

        check_records(path, read_text_records(path), spec, lambda record, spec: image_chat_problem(record, spec, path.parent))
        return None
    check_records(path, read_text_records(path), spec)
    return None


def check_datasets(recipe: Recipe) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """For `validate`: (key, problem) and (key, notice) pairs; reads local files, never the network."""
    problems, notices = [], []
    for group in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(recipe, group) or []):
            try:
                notice = check_source(spec, recipe)
            except DataError as error:
                problems.append((f"{group}.{index}.path", str(error)))
                continue
            if notice:
                notices.append((f"{group}.{index}.path", notice))
    return problems, notices


# ---------------------------------------------------------------- train: open with `datasets`


def _builder_error(source: Source, error: Exception) -> DataError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{source.label}: cannot load the dataset: {message}")


def open_dataset(source: Source, cache_dir: Path):
    """The source as a `datasets.Dataset` (Arrow, memory-mapped). Local files are converted once into
    `cache_dir` (datasets' own Arrow cache); hub datasets come from the local Hugging Face cache."""
    import datasets

    spec = source.spec
    path = Path(source.location)
    try:
        if source.kind == "file":
            if path.suffix == ".arrow":
                return file_split(datasets.Dataset.from_file(str(path)), source)
            if path.suffix == ".json":  # a JSON list or {"data": [...]}: datasets needs to be told which
                return file_split(datasets.Dataset.from_list(_read_json(path)), source)
            return file_split(datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train",
                                                    cache_dir=str(cache_dir)), source)
        if source.kind == "folder":
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return loaded[spec.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(str(path), name=spec.name, data_files=spec.data_files, split=spec.split,
                                         cache_dir=str(cache_dir))
        return _open_hub(source)
    except DataError:
        raise
    except KeyError:
        raise DataError(f"{source.label}: no split {spec.split!r}") from None
    except Exception as error:  # datasets raises many types (DatasetGenerationError, ValueError, FileNotFoundError…)
        if source.kind == "file" and path.suffix in (".jsonl", ".csv"):
            # pyarrow's reader stops at the first bad line without saying which record: find it exactly.
            check_records(path, read_text_records(path), spec)
        raise _builder_error(source, error) from None


def _file_slices(split: str, count: int) -> list[tuple[int, int]]:
    """(start, end) ranges a split spec takes of a single file, the train split: train, train[:10%],
    train[100:200]+train[-50:], read as `datasets` reads them (percent boundaries rounded to the closest)."""
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": count})
    except (ValueError, AssertionError) as error:
        raise DataError(f"split {split!r}: a single file is one split, train; take part of it with a slice such as "
                        f"train[:10%] or train[100:200] ({error})") from None
    return [(part.from_, part.to) for part in parts]


def file_split(dataset, source: Source):
    """A single file's dataset, cut to the recipe's split (the whole file unless it names a slice)."""
    if source.spec.split == "train":
        return dataset
    try:
        slices = _file_slices(source.spec.split, len(dataset))
    except DataError as error:
        raise DataError(f"{source.label}: {error}") from None
    return dataset.select([index for start, end in slices for index in range(start, end)])


def _open_hub(source: Source):
    import datasets

    spec = source.spec
    if offline() and not hub_cache_folders(source.location):
        raise DataError(f"{source.location}: a hub dataset id that is not in the local Hugging Face cache, and this "
                        "machine is offline (HF_HUB_OFFLINE); " + HUB_HINT.format(id=source.location))
    try:
        return datasets.load_dataset(source.location, name=spec.name, data_files=spec.data_files, split=spec.split,
                                     revision=spec.revision)
    except (ConnectionError, OSError) as error:
        raise DataError(f"{source.location}: cannot reach or find the hub dataset ({error}); "
                        + HUB_HINT.format(id=source.location)) from None
