"""The tokenized-data cache: one folder per key, holding the Arrow files `Dataset.map` wrote and a manifest.

The key covers everything that decides the tokens and nothing else: each dataset's content (its bytes, or a
hub dataset's fingerprint) and options, the tokenizer (vocabulary, normalizer, chat template, special tokens),
sequence_len, train_on_inputs and ftclip's tokenization format. An entry is built in a staging folder and
renamed into place with its manifest written last, so a killed `preprocess` never leaves an entry a later
run would trust; an entry whose files do not match its manifest is a miss and is rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from ftclip.recipe import Recipe

FORMAT_VERSION = 2  # bump when tokenization or masking rules change
MANIFEST = "manifest.json"
BUILD_LOG = "builds.log"


def cache_dir(recipe: Recipe) -> Path:
    if recipe.dataset_cache_dir:
        return Path(recipe.dataset_cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ftclip" / "tokenized"


def tokenizer_digest(tokenizer) -> str:
    """The vocabulary, merges, normalizer, special tokens and chat template: what turns text into ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True),
        str(getattr(tokenizer, "add_bos_token", None)), str(getattr(tokenizer, "add_eos_token", None)),
    ]
    path = getattr(tokenizer, "_tokenizer_path", None)  # mistral-common: its file and version encode the chats
    if type(tokenizer).__name__ == "MistralCommonBackend" and path is not None:
        from importlib.metadata import version

        parts += [_sha256(Path(path)), version("mistral-common")]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileDigests:
    """SHA-256 of data files, remembered by (path, size, mtime) so a warm start does not re-read gigabytes."""

    def __init__(self, folder: Path):
        self.path = folder / "digests.json"
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def of(self, path: Path) -> str:
        stat = path.stat()
        mark = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if mark not in self.known:
            self.known[mark] = _sha256(path)
            self.changed = True
        return self.known[mark]

    def of_folder(self, folder: Path) -> str:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        listing = [(str(p.relative_to(folder)), self.of(p)) for p in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def save(self) -> None:
        if self.changed:
            try:
                write_atomically(self.path, json.dumps(self.known).encode())
            except OSError:
                pass  # only a speed-up: the next run hashes again


def writer_id() -> str:
    """This process, among all nodes that may share the cache folder: process ids repeat across machines (and
    containers), so staging names carry the host too."""
    return f"{socket.gethostname()}-{os.getpid()}"


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{writer_id()}")
    staging.write_bytes(data)
    os.replace(staging, path)


def entry_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def read_manifest(entry: Path) -> dict | None:
    """The entry's manifest when every file it names is there at its recorded size, else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name, size in manifest["files"].items():
            if (entry / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def staging_folder(root: Path, key: str) -> Path:
    _remove_abandoned_staging(root)
    staging = root / f".{key}.tmp-{writer_id()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _remove_abandoned_staging(root: Path) -> None:
    """Staging folders of processes that no longer run (a killed preprocess) are never used; clear them. Only
    this host's: on a shared filesystem another node's process id says nothing here."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for folder in root.glob(".*.tmp-*"):
        match = _STAGING.search(folder.name)
        if match and match["host"] in (None, host) and not _alive(int(match["pid"])):
            shutil.rmtree(folder, ignore_errors=True)


_STAGING = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")  # host absent: a folder an older ftclip left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, entry: Path, manifest: dict) -> Path:
    """Write the manifest last and rename the staging folder into place (another process may have won the
    race with an identical entry: then keep theirs)."""
    manifest = {**manifest, "files": {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}}
    write_atomically(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
    if read_manifest(entry) is not None:
        shutil.rmtree(staging, ignore_errors=True)
        return entry
    shutil.rmtree(entry, ignore_errors=True)  # a damaged entry under the same key
    os.rename(staging, entry)
    with open(entry.parent / BUILD_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps({"key": entry.name, "pid": os.getpid(), "rank": int(os.environ.get("RANK", "0")),
                              "node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname()}) + "\n")
    return entry
