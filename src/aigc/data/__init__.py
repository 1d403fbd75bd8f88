"""Collect + preprocess: sources -> cleaned, split, tokenized arrays on disk.

Text: `prepare_text(source, out, ...)` writes train.bin / val.bin / tokenizer.json / meta.json;
`load_prepared(dir)` reads them back (memory-mapped). Built-in corpora: `BUILTINS`,
`builtin_status()`.
"""

from aigc.data.sources import BUILTINS, builtin_status, data_search_path, download_builtin, open_source
from aigc.data.text import DataConfig, PreparedText, describe, load_prepared, prepare_text

__all__ = [
    "BUILTINS",
    "DataConfig",
    "PreparedText",
    "builtin_status",
    "data_search_path",
    "describe",
    "download_builtin",
    "load_prepared",
    "open_source",
    "prepare_text",
]
