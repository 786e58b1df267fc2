"""QA datasets as typed records. A new dataset is one file in this package (see base.DatasetLoader);
every module here is imported so that its `@register_dataset` runs."""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    LOADERS,
    SHIPPED,
    DatasetLoader,
    Paragraph,
    QARecord,
    RecordError,
    contains_answer,
    get_loader,
    load_records,
    match_key,
    normalize_text,
    records_to_table,
    register_dataset,
    resolve_source,
    table_to_records,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "LOADERS",
    "SHIPPED",
    "DatasetLoader",
    "Paragraph",
    "QARecord",
    "RecordError",
    "contains_answer",
    "get_loader",
    "load_records",
    "match_key",
    "normalize_text",
    "records_to_table",
    "register_dataset",
    "resolve_source",
    "table_to_records",
]
