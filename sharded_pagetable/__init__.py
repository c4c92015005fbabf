"""sharded-pagetable: a KV-cache page table whose request rows are sharded over processes.

The core imports no Ray; ``backend="ray"`` loads :mod:`ray_actors` on demand.
"""

from .config import RayOptions, TableConfig, TableDefaults
from .constants import MAX_PAGE_ID, PAGE_TABLE_PADDING_VAL, SLOT_MAPPING_PADDING_VAL, cdiv
from .coordinator.coordinator import ShardedPageTable
from .coordinator.metrics import TableMetrics, serve_metrics
from .coordinator.receipt import CommitReceipt, ShardReceipt
from .defaults import configure, default_config
from .errors import (
    BatchTooLargeError,
    ConfigError,
    FencedError,
    PageTableFullError,
    RunOnShardsError,
    ShardFailedError,
    WireFormatError,
)
from .routing.layout import ShardLayout
from .shard.kv_copy import apply_kv_copies
from .table.page_table import MultiGroupPageTable, PageTable

__all__ = [
    "MAX_PAGE_ID",
    "PAGE_TABLE_PADDING_VAL",
    "SLOT_MAPPING_PADDING_VAL",
    "BatchTooLargeError",
    "CommitReceipt",
    "ConfigError",
    "FencedError",
    "MultiGroupPageTable",
    "PageTable",
    "PageTableFullError",
    "RayOptions",
    "RunOnShardsError",
    "ShardFailedError",
    "ShardLayout",
    "ShardReceipt",
    "ShardedPageTable",
    "TableConfig",
    "TableDefaults",
    "TableMetrics",
    "WireFormatError",
    "apply_kv_copies",
    "cdiv",
    "configure",
    "default_config",
    "serve_metrics",
]
