"""Prometheus metrics of a table, scraped over real HTTP on 127.0.0.1 and compared with what
the table reported through its receipts."""

from __future__ import annotations

import re
import urllib.request

import pytest

import sharded_pagetable as sp

ROWS, MAX_LEN, PAGE_SIZES = 32, 256, (16, 64)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(spt_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_metrics_are_off_by_default():
    with sp.ShardedPageTable(ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=2, warmup=False) as t:
        assert t.metrics is None


def test_scraped_metrics_match_the_receipts():
    with sp.ShardedPageTable(
        ROWS, MAX_LEN, 128, PAGE_SIZES, num_shards=2, metrics=True, warmup=False
    ) as t:
        server, port = sp.serve_metrics(t.metrics.registry)
        try:
            name = t.metrics.name
            sent_bytes = sent_rows = 0
            for k in range(5):
                t.append_row([[k + 1], [k + 2]], k)
                t.append_row([[k + 50], []], ROWS - 1 - k)
                r = t.commit(ROWS)
                sent_bytes += r.bytes
                sent_rows += r.rows
            t.append_row([[99], []], 3)
            flying = t.commit(ROWS, wait=False)
            during = scrape(port)
            assert during[f'spt_epochs_in_flight{{table="{name}"}}'] == 1
            t.wait()
            t.recover()
            got = scrape(port)
            sent_bytes += flying.bytes
            sent_rows += flying.rows
        finally:
            server.shutdown()
    label = f'{{table="{name}"}}'
    assert got[f"spt_epoch{label}"] == 6
    assert got[f"spt_epochs_in_flight{label}"] == 0
    assert got[f"spt_commit_seconds_count{label}"] == 6
    assert got[f"spt_commit_bytes_total{label}"] == sent_bytes
    assert got[f"spt_commit_rows_total{label}"] == sent_rows
    assert got[f"spt_recoveries_total{label}"] == 1
    # A shard's apply is recorded for the epochs that touched it: both took the first five,
    # only shard 0 (row 3) the sixth.
    for shard, applied in ((0, 6), (1, 5)):
        key = f'spt_shard_apply_seconds_count{{shard="{shard}",table="{name}"}}'
        assert got[key] == applied
    assert got[f"spt_commit_seconds_sum{label}"] > 0


def test_metrics_option_in_a_config():
    from sharded_pagetable.config import ConfigError, TableConfig

    base = {
        "max_num_reqs": ROWS,
        "max_model_len": MAX_LEN,
        "max_num_batched_tokens": 128,
        "page_sizes": list(PAGE_SIZES),
        "num_shards": 2,
        "warmup": False,
    }
    with sp.ShardedPageTable.from_config(TableConfig.from_dict({**base, "metrics": True})) as t:
        assert isinstance(t.metrics, sp.TableMetrics)
    with pytest.raises(ConfigError, match="metrics"):
        TableConfig.from_dict({**base, "metrics": "yes"})
