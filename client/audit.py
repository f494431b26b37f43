"""A site's own record of what it ran for the server and what it sent back.

One JSON line per message, appended (never rewritten) by the ClientApp process that handled it
(client/app_guard.py): when, which run and app bundle (its hash), which message type and round,
how long the process took, whether the app was refused, and what left the site — the tensor names and bytes, the metric
names, or the error. No values: the log shows what crossed the boundary, not patient data.
`medfed status AUDIT_LOG` prints it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from medfed.common.errors import MedfedError

# `medfed client` tells its ClientApp processes where the log is through the environment
# (Flower starts them; there is no other channel).
AUDIT_ENV = "MEDFED_AUDIT_LOG"


def describe_reply(content) -> dict:
    """What a reply carries, by name and size (a Flower RecordDict): its tensors, its metric
    names, and the binary values of its config records (secure aggregation's keys, key shares
    and masked update), each as `record.key`; `bytes` counts the tensors and those values."""
    arrays = {name: record for name, record in content.array_records.items()}
    binary = {f"{name}.{key}": _binary_size(value) for name, record
              in content.config_records.items() for key, value in record.items()}
    binary = {key: size for key, size in binary.items() if size}
    return {
        "tensors": sorted(k for record in arrays.values() for k in record.keys()),
        "bytes": sum(len(a.data) for record in arrays.values() for a in record.values())
        + sum(binary.values()),
        "metrics": sorted(k for record in content.metric_records.values() for k in record.keys()),
        "binary": sorted(binary),
    }


def _binary_size(value) -> int:
    values = value if isinstance(value, list) else [value]
    return sum(len(v) for v in values if isinstance(v, bytes))


def append(path: Path, entry: dict) -> None:
    """Append one entry; O_APPEND so concurrent ClientApp processes never interleave a line."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def render(path: Path) -> list[str]:
    """The audit log as lines a site's data-protection officer can read."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MedfedError(f"cannot read the audit log {path} ({exc}); give the file `medfed client` "
                          f"writes beside its SuperNode log (supernode-<site>.audit.jsonl)") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(raw)
            head = (f"{entry['time']} run {entry['run']} app {entry['app_hash'][:12]} "
                    f"{entry['type']}" + (f" round {entry['round']}" if entry.get("round") else ""))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MedfedError(f"{path} line {number} is not a medfed audit entry; the file is not "
                              f"an audit log or was edited") from None
        if entry.get("refused"):
            lines.append(f"{head}: REFUSED ({entry['refused']})")
        elif entry.get("error"):
            lines.append(f"{head}: error sent back ({entry['error']})")
        else:
            sent = entry.get("sent", {})
            took = f" after {entry['seconds']:.1f} s" if isinstance(entry.get("seconds"), float) else ""
            lines.append(f"{head}: sent {len(sent.get('tensors', []))} tensors "
                         f"({sent.get('bytes', 0):,} bytes){took}, metrics "
                         f"{', '.join(sent.get('metrics', [])) or 'none'}"
                         + (f", binary {', '.join(sent['binary'])}" if sent.get("binary") else ""))
    return lines or [f"{path}: no messages yet"]
