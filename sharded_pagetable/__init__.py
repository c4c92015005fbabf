"""sharded-pagetable: a KV-cache page table whose request rows are sharded over processes.

The core imports no Ray; ``backend="ray"`` loads :mod:`ray_actors` on demand.
"""

from .config import RayOptions, TableConfig
from .constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL, SLOT_MAPPING_PADDING_VAL, cdiv
from .coordinator import ShardedPageTable
from .errors import ConfigError, PageTableFullError, ShardFailedError, WireFormatError
from .layout import ShardLayout
from .page_table import MultiGroupPageTable, PageTable
from .receipt import CommitReceipt, ShardReceipt

__all__ = [
    "MAX_PAGE_ID",
    "PAGE_TABLE_PADDING_VAL",
    "SLOT_MAPPING_PADDING_VAL",
    "CommitReceipt",
    "ConfigError",
    "MultiGroupPageTable",
    "PageTable",
    "PageTableFullError",
    "RayOptions",
    "ShardFailedError",
    "ShardLayout",
    "ShardReceipt",
    "ShardedPageTable",
    "TableConfig",
    "WireFormatError",
    "cdiv",
]
