"""The inbox's layout, shared by ingest (which fills and empties it) and housekeeping (which
bounds what it keeps).

    <inbox>/                         FCT_INBOX, default the checkout's data/inbox
      <label>/<file>, <file>         waiting; a dot-name is never picked up
      .processed/<batch>/<file>      landed (its mtime set to when it landed); housekeeping
                                     removes it after `processed_keep_days`
      .quarantine/<batch>/<file>     refused, beside `<file>.reason.txt` (one line); kept
      .retry/<file>.json             a file that may still be being written, left in place for
                                     another try: the batch that tried it, its size and mtime then
"""

from __future__ import annotations

import os
from pathlib import Path

from fct_assets.lib.resources import DATA_ROOT

INBOX_ENV = "FCT_INBOX"
PROCESSED = ".processed"
QUARANTINE = ".quarantine"
RETRY = ".retry"


def inbox_dir() -> Path:
    """FCT_INBOX, default the checkout's data/inbox."""
    return Path(os.environ.get(INBOX_ENV) or DATA_ROOT / "inbox")


def retry_marker(inbox: Path, relpath: str) -> Path:
    """Where the retry marker of the inbox file `relpath` is."""
    return inbox / RETRY / f"{relpath}.json"
