"""Read the records of an offline wandb run (its run-*.wandb file), to check what was logged.

The file is a LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32, length, type) that says whether it is a whole record or
the first, a middle or the last piece of one; records are wandb's own protobuf messages.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_history(run_dir: Path) -> list[dict]:
    """Every wandb.log call of an offline run as {'_step': n, key: value, ...}."""
    import json

    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.append(row)
    return rows


def logged_config(run_dir: Path) -> dict:
    import json

    (path,) = run_dir.glob("run-*.wandb")
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return {}


def logged_project(run_dir: Path) -> str:
    """The wandb project an offline run was started in."""
    (path,) = run_dir.glob("run-*.wandb")
    (project,) = {record.run.project for record in read_records(path) if record.WhichOneof("record_type") == "run"}
    return project
