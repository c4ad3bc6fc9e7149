"""JSON files pt2q writes and reads (FP8 measurements, IPEX qconf and quantities). Writes are atomic: a
temporary file in the target's folder, then `os.replace`, so a reader sees the old file or the whole
new one, never half of it. Reads turn a missing or truncated file into the caller's error class."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["read_json", "write_json_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, document, indent: int = 4) -> Path:
    """Write `document` as JSON to `path` (indented as IPEX writes its qconf); returns the path."""
    path = Path(path)
    text = json.dumps(document, indent=indent, allow_nan=False)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would
        # (or the mode of the file it replaces).
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def read_json(path: str | Path, error: type[Exception], what: str, remedy: str):
    """The JSON document at `path`; `error(message)` when it cannot be read or is not complete JSON.
    `what` names the file's kind in the message, `remedy` says how to get a good one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as cause:
        raise error(f"cannot read the {what} {str(path)!r}: {cause}") from cause
    try:
        return json.loads(text)
    except json.JSONDecodeError as cause:
        raise error(f"{path} is not a complete {what} (invalid JSON at line {cause.lineno}, column {cause.colno}: "
                    f"{cause.msg}; truncated?): {remedy}") from cause
