"""Line-oriented files that survive a writer killed mid-append."""

from __future__ import annotations

import os
from pathlib import Path


def drop_torn_tail(path: str | os.PathLike[str], *, keep_torn: Path | None = None) -> int:
    """Truncate a line-oriented file after its last '\n'; returns the bytes dropped.

    Call it under the file's lock: every complete record ends in '\n', so a file that does
    not can only end in an append whose writer was killed mid-write (a torn record). The torn
    bytes are appended to `keep_torn` when given, so nothing is silently lost.
    """
    with open(path, "r+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return 0
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        if keep_torn is not None:
            with open(keep_torn, "ab") as side:
                side.write(data[keep:] + b"\n")
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return len(data) - keep
