"""Exceptions raised by the page tables, the wire format and the shard backends."""


class PageTableFullError(ValueError):
    """An append would put more pages in a row than it can hold."""


class WireFormatError(ValueError):
    """A wire message was refused; nothing was applied."""


class BatchTooLargeError(ValueError):
    """An epoch holds more than a shard accepts (``WireLimits``); the coordinator refuses it
    before anything is sent, so nothing changed and no shard failed."""


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class ShardFailedError(RuntimeError):
    """A shard died, timed out or refused a batch; the commit published nothing.

    Attributes:
      shard: index of the failing shard.
      epoch: the epoch that was being committed.
    """

    def __init__(self, shard: int, epoch: int, reason: str, during: str | None = None) -> None:
        during = during or (f"committing epoch {epoch}" if epoch >= 0 else "")
        super().__init__(f"shard {shard} failed{' while ' + during if during else ''}: {reason}")
        self.shard = shard
        self.epoch = epoch
        self.reason = reason


class FencedError(RuntimeError):
    """A newer coordinator took over this table's shards: this one may no longer commit,
    roll back, export or recover them (it may still be closed, which only lets go).

    Attributes:
      generation: this coordinator's generation.
      holder: the generation the shards now obey.
    """

    def __init__(self, generation: int, holder: int) -> None:
        super().__init__(
            f"a newer coordinator (generation {holder:#x}) took over these shards; this one "
            f"(generation {generation:#x}) can no longer change them. Close it; the newer one "
            "holds the table."
        )
        self.generation = generation
        self.holder = holder


class RunOnShardsError(RuntimeError):
    """The function given to ``run_on_shards`` raised (or returned something that cannot be
    sent back) in a shard process; the table is untouched and stays healthy.

    Attributes:
      shard: the first shard where it failed.
      kind: the name of the exception's type.
    """

    def __init__(self, shard: int, kind: str, message: str) -> None:
        super().__init__(f"run_on_shards: the function raised {kind} on shard {shard}: {message}")
        self.shard = shard
        self.kind = kind
