"""One inbox writer of the churn harness (tests/reliability/test_churn.py), as a user's copy job:

    python churn_writer.py INBOX WRITER FILES SECONDS BASE_NPZ MANIFEST

Drops FILES files into INBOX/<label>/w<WRITER>_<k>.png, evenly spread over SECONDS. Each picture
is one of BASE_NPZ's images (`images` (N, C, H, W) uint8, `labels` (N,)) with noise of its own,
at the gallery's size, so its content id is known before ingest decodes it and no two files
(nor a file and a stored item) share one. Every SLOW_EVERY-th file is written slowly, in
PIECES pieces with pauses between them (its final size arrives up to a minute later, as from a
slow copy); every BAD_EVERY-th is no image at all (text under .png) and must be quarantined.

Writes MANIFEST (JSON: one entry per file: relpath, kind "whole" | "slow" | "bad", content_id
or null) once every file is complete, and prints "done N".
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fct_assets.ingest.ingest import content_id, decode_image
from fct_assets.lib.storage import encode_png

SLOW_EVERY = 5  # files k with k % SLOW_EVERY == 1 are written in pieces
BAD_EVERY = 20  # files k with k % BAD_EVERY == 7 are not images
# A slow copy: 8-20 pieces, 1-3 s apart, so the file grows for 8-60 s and its size and mtime
# change every few seconds (what a reader waiting for a stable file can see), long enough to
# meet an inbox sensor tick (every 10 s) and often the ingest run it launches, which reads the
# file 10-60 s after the tick (its worker has to start first; seen on this project's machine).
PIECES = (8, 20)
PAUSE_S = (1.0, 3.0)


def picture(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`base` (C, H, W) uint8 with noise in [-12, 12] on every pixel: a picture of its own."""
    noise = rng.integers(-12, 13, size=base.shape)
    return np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_slowly(path: Path, data: bytes, pauses: list[float]) -> None:
    """`data` into `path` in len(pauses) + 1 pieces, flushed, a pause after each but the last."""
    cut = np.linspace(0, len(data), len(pauses) + 2).astype(int)
    with open(path, "wb") as handle:
        for i in range(len(pauses) + 1):
            handle.write(data[cut[i] : cut[i + 1]])
            handle.flush()
            if i < len(pauses):
                time.sleep(pauses[i])


def main(inbox: Path, writer: int, files: int, seconds: float, base: Path, manifest: Path) -> None:
    stored = np.load(base)
    images, labels = stored["images"], stored["labels"]
    channels, height, width = images.shape[1:]
    rng = np.random.default_rng(1000 + writer)
    started = time.monotonic()
    entries, slow = [], []
    for k in range(files):
        time.sleep(max(0.0, started + k * seconds / files - time.monotonic()))
        n = (writer * files + k) % len(images)
        label = int(labels[n])
        relpath = f"{label}/w{writer}_{k:05d}.png"
        path = inbox / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if k % BAD_EVERY == 7:
            path.write_bytes(f"writer {writer} file {k}: not a picture\n".encode())
            entries.append({"relpath": relpath, "kind": "bad", "content_id": None})
            continue
        image = picture(images[n], rng)
        data = encode_png(image)
        # What ingest will decode: the same pixels, hence the same content id.
        assert np.array_equal(decode_image(data, channels, (height, width)), image), relpath
        if k % SLOW_EVERY == 1:
            pieces = int(rng.integers(PIECES[0], PIECES[1] + 1))
            pauses = rng.uniform(*PAUSE_S, size=pieces - 1).tolist()
            thread = threading.Thread(target=write_slowly, args=(path, data, pauses))
            thread.start()
            slow.append(thread)
            kind = "slow"
        else:
            path.write_bytes(data)
            kind = "whole"
        entries.append({"relpath": relpath, "kind": kind, "content_id": content_id(image)})
    for thread in slow:
        thread.join()
    manifest.write_text(json.dumps(entries))
    print(f"done {len(entries)}", flush=True)


if __name__ == "__main__":
    inbox, writer, files, seconds, base, manifest = sys.argv[1:7]
    main(Path(inbox), int(writer), int(files), float(seconds), Path(base), Path(manifest))
