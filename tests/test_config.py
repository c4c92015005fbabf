"""YAML configs: the shipped files parse, every bad value raises ``ConfigError`` naming the key,
and a local config builds a working ``ShardedPageTable``."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

import sharded_pagetable as sp
from sharded_pagetable.config import RayOptions, TableConfig
from sharded_pagetable.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LOCAL = CONFIGS / "local.yaml"
RAY_LOCAL = CONFIGS / "ray-local.yaml"

BASE = {
    "max_num_reqs": 64,
    "max_model_len": 256,
    "max_num_batched_tokens": 128,
    "page_sizes": [16, 64],
}


def test_local_yaml_parses() -> None:
    cfg = TableConfig.from_yaml(str(LOCAL))
    assert cfg.max_num_reqs == 256
    assert cfg.max_model_len == 2048
    assert cfg.max_num_batched_tokens == 512
    assert cfg.pages_per_shard == 512
    assert cfg.page_sizes == (16, 64)
    assert cfg.num_shards == 4
    assert cfg.backend == "local"
    assert cfg.row_axis == "data"
    assert dict(cfg.mesh) == {"data": 8}
    assert cfg.ray == RayOptions()


def test_ray_local_yaml_parses() -> None:
    cfg = TableConfig.from_yaml(str(RAY_LOCAL))
    assert cfg.backend == "ray"
    assert cfg.num_shards == 4
    assert dict(cfg.mesh) == {"data": 4}
    assert cfg.ray.address is None
    assert cfg.ray.devices_per_shard == 1
    assert cfg.ray.survivable
    assert cfg.ray.platform == "cpu"
    assert cfg.ray.timeout_s == 60
    assert cfg.ray.placement == "pack"
    assert cfg.ray.cpus_per_shard == 0
    # the Ray mesh covers the shard processes' devices exactly
    assert cfg.mesh[cfg.row_axis] == cfg.num_shards * cfg.ray.devices_per_shard


def test_overrides_apply() -> None:
    cfg = TableConfig.from_yaml(str(LOCAL), max_num_reqs=64, num_shards=2)
    assert (cfg.max_num_reqs, cfg.num_shards) == (64, 2)


def test_defaults() -> None:
    cfg = TableConfig.from_dict(BASE)
    assert cfg.num_shards == 1
    assert cfg.backend == "local"
    assert cfg.row_axis == "data"
    assert cfg.mesh is None
    assert cfg.num_pages is None
    assert cfg.warmup is True
    assert cfg.ray == RayOptions()
    assert isinstance(cfg.page_sizes, tuple)


def test_ray_options_from_mapping_and_object() -> None:
    cfg = TableConfig.from_dict({**BASE, "ray": {"placement": "spread", "timeout_s": 1.5}})
    assert cfg.ray.placement == "spread" and cfg.ray.timeout_s == 1.5
    opts = RayOptions(devices_per_shard=4)
    assert TableConfig.from_dict({**BASE, "ray": opts}).ray is opts
    assert TableConfig.from_dict({**BASE, "ray": None}).ray == RayOptions()


# --------------------------------------------------------------------------- bad values

BAD_TOP = [
    # (key named in the message, changes to BASE)
    ("bogus", {"bogus": 1}),
    ("max_num_reqs", {"max_num_reqs": 0}),
    ("max_num_reqs", {"max_num_reqs": -64}),
    ("max_num_reqs", {"max_num_reqs": True}),
    ("max_num_reqs", {"max_num_reqs": 64.0}),
    ("max_num_reqs", {"max_num_reqs": "64"}),
    ("max_num_reqs", {"max_num_reqs": None}),
    ("max_model_len", {"max_model_len": 0}),
    ("max_model_len", {"max_model_len": False}),
    ("max_num_batched_tokens", {"max_num_batched_tokens": -1}),
    ("max_num_batched_tokens", {"max_num_batched_tokens": True}),
    ("num_shards", {"num_shards": 0}),
    ("num_shards", {"num_shards": -2}),
    ("num_shards", {"num_shards": True}),
    ("page_sizes", {"page_sizes": []}),
    ("page_sizes", {"page_sizes": 16}),
    ("page_sizes", {"page_sizes": "16"}),
    ("page_sizes", {"page_sizes": None}),
    ("page_sizes", {"page_sizes": [16, 0]}),
    ("page_sizes", {"page_sizes": [16, -64]}),
    ("page_sizes", {"page_sizes": [True]}),
    ("page_sizes", {"page_sizes": [16.0]}),
    ("backend", {"backend": "mpi"}),
    ("backend", {"backend": "Local"}),
    ("backend", {"backend": None}),
    ("row_axis", {"row_axis": ""}),
    ("row_axis", {"row_axis": 0}),
    ("row_axis", {"row_axis": "rows", "mesh": {"data": 8}}),
    ("row_axis", {"mesh": {"model": 8}}),
    ("mesh", {"mesh": {}}),
    ("mesh", {"mesh": [8]}),
    ("mesh", {"mesh": 8}),
    ("mesh.data", {"mesh": {"data": 0}}),
    ("mesh.data", {"mesh": {"data": -8}}),
    ("mesh.data", {"mesh": {"data": True}}),
    ("mesh.model", {"mesh": {"data": 4, "model": "2"}}),
    ("num_pages", {"num_pages": 0}),
    ("num_pages", {"num_pages": -1}),
    ("num_pages", {"num_pages": True}),
    ("warmup", {"warmup": "yes"}),
    ("warmup", {"warmup": 1}),
    ("ray", {"ray": 5}),
    ("ray", {"ray": ["pack"]}),
    ("ray.bogus", {"ray": {"bogus": 1}}),
    ("ray.address", {"ray": {"address": 6379}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": 0}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": -2}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": True}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": 2.0}}),
    ("ray.platform", {"ray": {"platform": "tpu"}}),
    ("ray.platform", {"ray": {"platform": "CPU"}}),
    ("ray.timeout_s", {"ray": {"timeout_s": 0}}),
    ("ray.timeout_s", {"ray": {"timeout_s": -1.0}}),
    ("ray.timeout_s", {"ray": {"timeout_s": True}}),
    ("ray.timeout_s", {"ray": {"timeout_s": "60"}}),
    ("ray.placement", {"ray": {"placement": "strict_spread"}}),
    ("ray.placement", {"ray": {"placement": None}}),
    ("ray.namespace", {"ray": {"namespace": ""}}),
    ("ray.namespace", {"ray": {"namespace": 3}}),
    ("ray.cpus_per_shard", {"ray": {"cpus_per_shard": -1}}),
    ("ray.cpus_per_shard", {"ray": {"cpus_per_shard": False}}),
]


@pytest.mark.parametrize(("key", "change"), BAD_TOP, ids=[f"{k}={c}" for k, c in BAD_TOP])
def test_bad_value_raises_config_error_naming_key(key: str, change: dict, tmp_path) -> None:
    data = {**BASE, **change}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        TableConfig.from_dict(data)
    assert isinstance(info.value, ValueError)
    # the same through a YAML file (only for values YAML can express)
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TableConfig.from_yaml(str(path))


@pytest.mark.parametrize("missing", sorted(BASE))
def test_missing_required_key(missing: str, tmp_path) -> None:
    data = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        TableConfig.from_dict(data)
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=missing):
        TableConfig.from_yaml(str(path))


def test_missing_key_supplied_by_override() -> None:
    data = {k: v for k, v in BASE.items() if k != "max_num_reqs"}
    assert TableConfig.from_dict(data, max_num_reqs=8).max_num_reqs == 8


def test_bad_override_value_names_key() -> None:
    with pytest.raises(ConfigError, match="num_shards"):
        TableConfig.from_yaml(str(LOCAL), num_shards=0)


def test_unknown_override_key_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        TableConfig.from_yaml(str(LOCAL), bogus=1)


@pytest.mark.parametrize("where", ["top", "ray"])
def test_unknown_keys_of_mixed_types(where: str, tmp_path) -> None:
    extra = "1: 2\nzz: 3\n"
    body = yaml.safe_dump(BASE)
    if where == "top":
        text = body + extra
    else:
        text = body + "ray:\n" + "".join(f"  {line}\n" for line in extra.splitlines())
    path = tmp_path / "mixed.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        TableConfig.from_yaml(str(path))


def test_unknown_int_key_alone_is_refused(tmp_path) -> None:
    path = tmp_path / "intkey.yaml"
    path.write_text(yaml.safe_dump(BASE) + "1: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 1"):
        TableConfig.from_yaml(str(path))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- 1\n- 2\n", "mapping"),
        ("just a string\n", "mapping"),
        ("42\n", "mapping"),
        ("", "empty"),
        ("# only a comment\n", "empty"),
    ],
)
def test_non_mapping_file(text: str, match: str, tmp_path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        TableConfig.from_yaml(str(path))


def test_unknown_key_message_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as info:
        TableConfig.from_dict({**BASE, "max_num_req": 8})
    msg = str(info.value)
    assert "max_num_req" in msg and "max_num_reqs" in msg
    with pytest.raises(ConfigError) as info:
        TableConfig.from_dict({**BASE, "ray": {"timeout": 3}})
    assert "ray.timeout" in str(info.value) and "timeout_s" in str(info.value)


def test_config_is_frozen() -> None:
    cfg = TableConfig.from_dict(BASE)
    with pytest.raises(AttributeError):
        cfg.num_shards = 2  # type: ignore[misc]


# --------------------------------------------------------------------------- hostile input


def refused_quickly(load: Callable[[], object], key: str) -> str:
    """``load()`` raises ``ConfigError`` naming ``key`` in one short line, within 1 s and
    100 MB (traced allocations); returns the message."""
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load()
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert elapsed < 1.0, f"took {elapsed:.2f}s: {msg}"
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MB: {msg}"
    assert key in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def write(tmp_path: Path, text: str | bytes, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def alias_bomb() -> str:
    """The "billion laughs": 9 levels of 9 aliases, 9**9 (387 million) strings expanded."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in "bcdefghi":
        below = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join([f'*{below}'] * 9)}]")
    return "\n".join(lines) + "\nray: {timeout_s: *i}\n"


def test_alias_bomb_is_refused_at_its_first_anchor(tmp_path) -> None:
    bomb = alias_bomb()
    assert 420 <= len(bomb.encode()) <= 460  # the measured file was 440 bytes
    path = write(tmp_path, bomb)
    msg = refused_quickly(lambda: TableConfig.from_yaml(path), "line 1: a: ")
    assert "anchors and aliases are not allowed" in msg and path in msg


_HEAD = "max_num_reqs: 64\nmax_model_len: 256\nmax_num_batched_tokens: 128\n"
_BASE_TEXT = _HEAD + "page_sizes: [16]\n"  # lines 1-4


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("page_sizes: [16]\nray:\n  timeout_s: &t 5\n", "line 6: ray.timeout_s: "),
        ("page_sizes: [16]\nray: {timeout_s: *undefined}\n", "line 5: ray.timeout_s: "),
        ("page_sizes: &p [16, 64]\n", "line 4: page_sizes: "),
        ("page_sizes: [16, &p 64]\n", "line 4: page_sizes[1]: "),
        ("page_sizes: [16]\n&k row_axis: data\n", "line 5: the document: "),
    ],
)
def test_anchors_and_aliases_are_refused_naming_key_and_line(tmp_path, text, key) -> None:
    path = write(tmp_path, _HEAD + text)
    msg = refused_quickly(lambda: TableConfig.from_yaml(path), key)
    assert "anchors and aliases are not allowed" in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_num_reqs: 128\n", "line 5: duplicate key max_num_reqs (first at line 1)"),
        ("'max_num_reqs': 128\n", "duplicate key max_num_reqs"),
        ("ray:\n  timeout_s: 5\n  timeout_s: 6\n", "line 7: duplicate key ray.timeout_s"),
        ("mesh: {data: 4, data: 8}\n", "line 5: duplicate key mesh.data"),
        ("ray: {<<: {timeout_s: 5}, timeout_s: 6}\n", "line 5: ray: YAML merge keys"),
    ],
)
def test_duplicate_and_merge_keys_are_refused(tmp_path, text, key) -> None:
    path = write(tmp_path, _BASE_TEXT + text)
    refused_quickly(lambda: TableConfig.from_yaml(path), key)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("ray: [\n", "line 6: YAML syntax error"),
        ("ray:\n timeout_s: 5\n  placement: pack\n", "line 7: YAML syntax error"),
        ("ray:\n\ttimeout_s: 5\n", "line 6: YAML syntax error"),
        ('row_axis: "data\n', "line 6: YAML syntax error"),
        ("---\nmax_num_reqs: 8\n", "line 5: YAML syntax error"),  # a second document
        ("ray: !!python/object:os.system {}\n", "line 5: YAML syntax error"),
        ("? [1, 2]\n: 3\n", "line 5: YAML syntax error"),
        ("num_pages: " + "9" * 5000 + "\n", "bad value"),  # past Python's int str limit
        ("ray: {timeout_s: 2001-13-45}\n", "bad value"),  # a timestamp that is no date
        ("mesh: " + "[" * 20 + "]" * 20 + "\n", "line 5: mesh[0][0]"),  # nested too deep
    ],
)
def test_bad_yaml_is_a_config_error_naming_file_and_line(tmp_path, text, where) -> None:
    path = write(tmp_path, _BASE_TEXT + text)
    msg = refused_quickly(lambda: TableConfig.from_yaml(path), where)
    assert msg.startswith(f"config file {path}"), msg


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_BASE_TEXT.encode() + b"row_axis: \xff\xfe\n", "line 5: not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
        (_BASE_TEXT.encode() + b"row_axis: da\x00ta\n", "line 5: not YAML text"),
        (_BASE_TEXT.encode() + b"#" * (1 << 16), "larger than 65536 bytes"),
    ],
    ids=["bad-utf8", "png", "nul", "too-big"],
)
def test_binary_and_oversized_files_are_config_errors(tmp_path, data, where) -> None:
    path = write(tmp_path, data)
    refused_quickly(lambda: TableConfig.from_yaml(path), where)


BAD_RANGE = [
    # (key named in the message, changes to BASE): values the old checks accepted
    ("ray.timeout_s", {"ray": {"timeout_s": float("nan")}}),
    ("ray.timeout_s", {"ray": {"timeout_s": float("inf")}}),
    ("ray.timeout_s", {"ray": {"timeout_s": 1e12}}),
    ("ray.timeout_s", {"ray": {"timeout_s": 86400.5}}),
    ("ray.timeout_s", {"ray": {"timeout_s": 10**5000}}),
    ("ray.cpus_per_shard", {"ray": {"cpus_per_shard": float("nan")}}),
    ("ray.cpus_per_shard", {"ray": {"cpus_per_shard": float("inf")}}),
    ("ray.cpus_per_shard", {"ray": {"cpus_per_shard": 1e9}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": 1_000_000}}),
    ("ray.devices_per_shard", {"ray": {"devices_per_shard": 4097}}),
    (
        "ray.devices_per_shard",
        {"backend": "ray", "num_shards": 64, "ray": {"devices_per_shard": 128}},
    ),
    ("max_num_reqs", {"max_num_reqs": 2**40}),
    ("max_num_reqs", {"max_num_reqs": 2**31}),
    ("max_model_len", {"max_model_len": 2**31}),
    ("max_num_batched_tokens", {"max_num_batched_tokens": 2**40}),
    ("num_shards", {"num_shards": 4097, "max_num_reqs": 8192}),
    ("num_shards must be at most max_num_reqs=64", {"num_shards": 128}),
    ("page_sizes[0]", {"page_sizes": [2**31]}),
    ("page_sizes", {"page_sizes": [16] * 65}),
    ("page_sizes[0]=1", {"max_num_reqs": 2**20, "max_model_len": 2**20, "page_sizes": [1]}),
    ("num_pages", {"num_pages": 2**31 + 1}),
    ("num_pages", {"num_pages": 2**40}),
    ("mesh.data", {"mesh": {"data": 5000}}),
    ("mesh", {"mesh": {"data": 64, "model": 128}}),
    ("mesh axis names", {"mesh": {"data": 8, 1: 2}}),
    ("max_recoveries", {"max_recoveries": 10**6}),
    ("max_recoveries", {"max_recoveries": 0}),
    ("num_shards=3", {"num_shards": 3, "mesh": {"data": 8}}),
    # A Ray shard process needs devices of its own: 16 shards cannot share 8 devices.
    ("num_shards=16", {"num_shards": 16, "backend": "ray", "mesh": {"data": 8}}),
]


@pytest.mark.parametrize(("key", "change"), BAD_RANGE, ids=[k for k, _ in BAD_RANGE])
def test_out_of_range_value_is_refused_naming_key(key: str, change: dict, tmp_path) -> None:
    data = {**BASE, **change}
    refused_quickly(lambda: TableConfig.from_dict(data), key)
    try:
        text = yaml.safe_dump(data)
    except (yaml.YAMLError, ValueError):  # 10**5000 has no str()
        return
    path = write(tmp_path, text)
    refused_quickly(lambda: TableConfig.from_yaml(path), key)


@pytest.mark.parametrize(
    "text", ["timeout_s: .nan", "timeout_s: .inf", "timeout_s: -.inf", "timeout_s: 1.0e+12"]
)
def test_timeout_literals_from_the_issue(text: str, tmp_path) -> None:
    path = write(tmp_path, _BASE_TEXT + f"ray: {{{text}}}\n")
    refused_quickly(lambda: TableConfig.from_yaml(path), "ray.timeout_s must be a finite number")


def test_limits_themselves_are_accepted() -> None:
    cfg = TableConfig.from_dict(
        {
            **BASE,
            "max_num_reqs": 4096,
            "num_shards": 4096,
            "mesh": {"data": 4096},
            "num_pages": 2**31,
            "max_recoveries": 1000,
            "ray": {"timeout_s": 86400, "devices_per_shard": 4096, "cpus_per_shard": 1024.0},
        }
    )
    assert cfg.num_pages == 2**31 and cfg.ray.timeout_s == 86400
    assert TableConfig.from_dict({**BASE, "ray": {"timeout_s": 0.001}}).ray.timeout_s == 0.001


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"row_axis": "r" * 1_000_000, "mesh": {"data": 8}}, "row_axis"),
        ({"page_sizes": ["x" * 1_000_000]}, "page_sizes[0]"),
        ({"page_sizes": list(range(1_000_000))}, "page_sizes"),
        ({"ray": {"platform": ["gpu"] * 1_000_000}}, "ray.platform"),
        ({"ray": {"y" * 1_000_000: 1}}, "unknown config key ray."),
        ({"mesh": {"data": 10**5000}}, "mesh.data"),
    ],
    ids=["long-str", "long-item", "long-list", "long-choice", "long-key", "huge-int"],
)
def test_messages_stay_short_for_huge_values(change: dict, key: str) -> None:
    refused_quickly(lambda: TableConfig.from_dict({**BASE, **change}), key)


# --------------------------------------------------------------------------- build


def _exercise(t: sp.ShardedPageTable) -> None:
    assert len(t) == 2
    assert t[0].get_cpu_tensor().shape == (64, 16)
    assert t[1].get_cpu_tensor().shape == (64, 4)
    t.add_row([[1, 2, 3], [4]], 0)
    t.add_row([[5], [6, 7]], 63)  # the last row lives on the last shard
    receipt = t.commit(64)
    assert receipt.epoch >= 1
    dev = np.asarray(t[0].get_device_tensor())
    assert dev[0, :4].tolist() == [1, 2, 3, 0]
    assert dev[63, :2].tolist() == [5, 0]
    np.testing.assert_array_equal(t.device_snapshot(1), t[1].get_cpu_tensor())


def test_from_config_local_with_overrides_builds_and_closes() -> None:
    t = sp.ShardedPageTable.from_config(
        str(LOCAL), max_num_reqs=64, max_model_len=256, pages_per_shard=None
    )
    try:
        assert t.num_shards == 4
        assert t.layout.num_blocks == 8
        _exercise(t)
    finally:
        t.close()
    t.close()  # safe twice


def test_from_dict_build_2d_mesh_context_manager() -> None:
    cfg = TableConfig.from_dict(
        {**BASE, "num_shards": 2, "mesh": {"data": 4, "model": 2}, "warmup": False}
    )
    with sp.ShardedPageTable.from_config(cfg) as t:
        assert t.mesh_axes == {"data": 4, "model": 2}
        assert t.layout.num_blocks == 4
        _exercise(t)


@pytest.mark.parametrize(
    "change",
    [{"mesh": {"data": 8}}, {"backend": "ray", "num_shards": 4}, {"num_shards": 4}],
    ids=["mesh", "ray", "local"],
)
def test_rows_that_do_not_split_are_accepted(change: dict) -> None:
    """Any max_num_reqs is a valid config: the table rounds its row capacity up."""
    assert TableConfig.from_dict({**BASE, "max_num_reqs": 60, **change}).max_num_reqs == 60


def test_build_rounds_rows_up_and_refuses_rows_past_max_num_reqs() -> None:
    cfg = TableConfig.from_dict({**BASE, "max_num_reqs": 60, "num_shards": 4, "warmup": False})
    with sp.ShardedPageTable.from_config(cfg) as t:
        assert (t.max_num_reqs, t.layout.max_num_reqs, t.layout.rows_per_shard) == (60, 64, 16)
        assert t[0].get_cpu_tensor().shape == (60, 16)
        with pytest.raises(IndexError, match=r"row 60 is out of range: valid rows are 0\.\.59"):
            t.add_row([[1], [2]], 60)
        t.add_row([[5, 6], [7]], 59)  # the last row: shard 3, whose rows 60..63 stay empty
        t.commit(60)
        dev = np.asarray(t[0].get_device_tensor())  # the capacity's rows: 64
        assert dev.shape == (64, 16) and dev[59, :3].tolist() == [5, 6, 0] and not dev[60:].any()
        np.testing.assert_array_equal(t.device_snapshot(0), t[0].get_cpu_tensor())


# --------------------------------------------------------------------------- YAML 1.1 forms

# Plain scalars that YAML 1.1 (PyYAML) and YAML 1.2 read differently, or only 1.1 reads as a
# number or bool: (YAML text after the base, the key and line named, what the message says).
AMBIGUOUS = [
    ("max_num_reqs: 040", "line 1: max_num_reqs: 040", "octal 32"),
    ("max_num_reqs: 00", "line 1: max_num_reqs: 00", "leading zero"),
    ("max_num_reqs: -040", "line 1: max_num_reqs: -040", "octal -32"),
    ("max_num_reqs: 0b1000000", "line 1: max_num_reqs: 0b1000000", "write 64"),
    ("max_num_reqs: 6_4", "line 1: max_num_reqs: 6_4", "write 64"),
    ("max_num_reqs: 1:04", "line 1: max_num_reqs: 1:04", "write 64"),
    ("max_num_reqs: 0x40", "line 1: max_num_reqs: 0x40", "write 64"),
    ("page_sizes: [016]", "line 4: page_sizes[0]: 016", "octal 14"),
    ("mesh: {data: 010}", "line 5: mesh.data: 010", "octal 8"),
    ("ray:\n  devices_per_shard: 02", "line 6: ray.devices_per_shard: 02", "octal 2"),
    ("ray: {timeout_s: 1_0.5}", "line 5: ray.timeout_s: 1_0.5", "write 10.5"),
    ("ray: {timeout_s: '1:30.5'}", None, None),  # quoted: a string, refused as one
    ("ray: {timeout_s: 1:30.5}", "line 5: ray.timeout_s: 1:30.5", "write 90.5"),
    ("ray: {timeout_s: 1e-300}", "line 5: ray.timeout_s: 1e-300", "text in YAML 1.1"),
    ("ray: {timeout_s: 1e3}", "line 5: ray.timeout_s: 1e3", "text in YAML 1.1"),
    ("max_num_reqs: 089", "line 1: max_num_reqs: 089", "text in YAML 1.1"),
    ("warmup: yes", "line 5: warmup: yes", "true or false"),
    ("metrics: off", "line 5: metrics: off", "true or false"),
    ("ray: {detached: On}", "line 5: ray.detached: On", "true or false"),
    ("ray: {standby: NO}", "line 5: ray.standby: NO", "true or false"),
]


def _yaml_case(tmp_path, text: str) -> str:
    """The base config with ``text`` in place of its line for the same key (line 1
    max_num_reqs, line 4 page_sizes), else after it (from line 5)."""
    lines = _BASE_TEXT.splitlines()
    key = text.split(":", 1)[0]
    same = [i for i, line in enumerate(lines) if line.startswith(key + ":")]
    if same:
        lines[same[0]] = text
    else:
        lines.append(text)
    return write(tmp_path, "\n".join(lines) + "\n")


@pytest.mark.parametrize(("text", "where", "says"), AMBIGUOUS, ids=[t for t, _, _ in AMBIGUOUS])
def test_yaml_1_1_only_forms_are_refused_naming_key_and_decimal(tmp_path, text, where, says):
    path = _yaml_case(tmp_path, text)
    if where is None:
        refused_quickly(lambda: TableConfig.from_yaml(path), "ray.timeout_s must be")
        return
    msg = refused_quickly(lambda: TableConfig.from_yaml(path), where)
    assert says in msg, msg


@pytest.mark.parametrize(
    "text",
    [
        "max_num_reqs: 64",
        "max_num_reqs: +64",
        "ray: {timeout_s: 1.5}",
        "ray: {timeout_s: 1.0e+1}",
        "ray: {timeout_s: 2.}",
        "ray: {timeout_s: 0.010}",
        "ray: {timeout_s: 5, cpus_per_shard: 0}",
        "ray: {detached: true, name: x1e3}",
        "warmup: False",
        "ray: {name: '040', namespace: \"1e3\"}",  # quoted: strings as written
    ],
)
def test_plain_decimal_numbers_and_true_false_are_read_as_before(tmp_path, text):
    cfg = TableConfig.from_yaml(_yaml_case(tmp_path, text))
    assert cfg.max_num_reqs == 64


@pytest.mark.parametrize(
    ("key", "ray"),
    [
        ("ray.timeout_s", {"timeout_s": 1e-300}),
        ("ray.timeout_s", {"timeout_s": 5e-324}),
        ("ray.timeout_s", {"timeout_s": 0.0009}),
        ("ray.timeout_s", {"timeout_s": -0.0}),
        ("ray.timeout_s", {"timeout_s": float("-inf")}),
        ("ray.cpus_per_shard", {"cpus_per_shard": 1e-300}),
        ("ray.cpus_per_shard", {"cpus_per_shard": 5e-5}),
        ("ray.cpus_per_shard", {"cpus_per_shard": -0.5}),
    ],
)
def test_tiny_timeouts_and_cpu_shares_are_refused(key, ray, tmp_path) -> None:
    msg = refused_quickly(lambda: TableConfig.from_dict({**BASE, "ray": ray}), key)
    assert "0.001" in msg or "0.0001" in msg, msg
    path = write(tmp_path, _BASE_TEXT + f"ray: {{{next(iter(ray))}: {ray[next(iter(ray))]!r}}}\n")
    refused_quickly(lambda: TableConfig.from_yaml(path), key)
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        RayOptions(**ray)


def test_yaml_tiny_timeout_literal(tmp_path) -> None:
    path = write(tmp_path, _BASE_TEXT + "ray: {timeout_s: 1.0e-300}\n")
    refused_quickly(lambda: TableConfig.from_yaml(path), "ray.timeout_s must be")


def test_smallest_timeout_and_cpu_share_are_accepted() -> None:
    ray = RayOptions(timeout_s=0.001, cpus_per_shard=0.0001)
    assert (ray.timeout_s, ray.cpus_per_shard) == (0.001, 0.0001)
    assert RayOptions(cpus_per_shard=0).cpus_per_shard == 0
