"""Exceptions raised by the page tables, the wire format and the shard backends."""


class PageTableFullError(ValueError):
    """An append would put more pages in a row than it can hold."""


class WireFormatError(ValueError):
    """A wire message was refused; nothing was applied."""


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class ShardFailedError(RuntimeError):
    """A shard died, timed out or refused a batch; the commit published nothing.

    Attributes:
      shard: index of the failing shard.
      epoch: the epoch that was being committed.
    """

    def __init__(self, shard: int, epoch: int, reason: str) -> None:
        super().__init__(f"shard {shard} failed while committing epoch {epoch}: {reason}")
        self.shard = shard
        self.epoch = epoch
        self.reason = reason
