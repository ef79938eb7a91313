"""Axolotl configs → ftclip recipes. One table (AXOLOTL_KEYS, DATASET_KEYS in table.py) says, for every
Axolotl key ftclip knows about, whether it maps to an ftclip key, is dropped (no effect on what is trained) or
is refused (it changes training and ftclip has no equivalent). The importer (importer.py), `validate`'s
messages for Axolotl keys and the README's "Coming from Axolotl" table are all made from it; converters.py
reads the values that need more than a rename. Meanings and defaults follow Axolotl's schema
(src/axolotl/utils/schemas/*.py in axolotl-ai-cloud/axolotl)."""

from ftclip.axolotl.importer import ImportResult, import_config, import_mapping, output_paths, write_atomically
from ftclip.axolotl.table import (
           AXOLOTL_KEYS,
           DATASET_KEYS,
           mapping_markdown,
)

__all__ = ["AXOLOTL_KEYS", "DATASET_KEYS", "ImportResult", "import_config", "import_mapping", "mapping_markdown",
           "output_paths", "write_atomically"]
