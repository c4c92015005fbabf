"""sharded-pagetable: a KV-cache page table whose request rows are sharded over processes.

The core imports no Ray; ``backend="ray"`` loads :mod:`ray_actors` on demand.
"""

from .constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL, SLOT_MAPPING_PADDING_VAL, cdiv
from .errors import ConfigError, PageTableFullError, ShardFailedError, WireFormatError
from .page_table import MultiGroupPageTable, PageTable

__all__ = [
    "MAX_PAGE_ID",
    "PAGE_TABLE_PADDING_VAL",
    "SLOT_MAPPING_PADDING_VAL",
    "ConfigError",
    "MultiGroupPageTable",
    "PageTable",
    "PageTableFullError",
    "ShardFailedError",
    "WireFormatError",
    "cdiv",
]
