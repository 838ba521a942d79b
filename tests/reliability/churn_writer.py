"""One inbox writer of the churn harness (tests/reliability/test_churn.py), as a user's copy job:

    python churn_writer.py INBOX WRITER FILES SECONDS BASE_NPZ GATES MANIFEST

Drops FILES files into INBOX/<label>/w<WRITER>_<k>.png, evenly spread over SECONDS. Each picture
is one of BASE_NPZ's images (`images` (N, C, H, W) uint8, `labels` (N,)) with noise of its own,
at the gallery's size, so its content id is known before ingest decodes it and no two files
(nor a file and a stored item) share one. Every BAD_EVERY-th file is no image at all (text under
.png) and must be quarantined. Every SLOW_EVERY-th is a slow copy (`copy_slowly`): a few KB (a
PNG comment before its pixels) that grow a little every 0.5-2 s for 10 s to over a minute.

A slow copy is still growing when an ingest step reaches it: the test opens the gate
GATES/<relpath with '/' as '__'> once an ingest step that lists the file logged that it is
about to read its files, and the copy goes on growing for GRACE_S more before it completes.
A reader that waits for a stable size and mtime therefore sees a growing file and waits; one
that reads at once reads a truncated file. Without a gate (no step listed it) the copy completes
after HOLD_S.

Writes MANIFEST (JSON: one entry per file: relpath, kind "whole" | "slow" | "bad", content_id
or null, and for a slow copy whether a step reached it while it grew, "met_a_reader") once
every file is complete, and prints "done N".
"""

from __future__ import annotations

import io
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from fct_assets.ingest.ingest import content_id, decode_image

SLOW_EVERY = 5  # files k with k % SLOW_EVERY == 1 are slow copies
BAD_EVERY = 20  # files k with k % BAD_EVERY == 7 are not images
PAUSE_S = (0.5, 2.0)  # between two pieces of a slow copy: its mtime changes this often
NOMINAL_S = (8.0, 30.0)  # a slow copy's duration when nothing holds it
PADDING = (2000, 4000)  # bytes of PNG comment a slow copy carries before its pixels
GRACE_S = 10.0  # growth after its gate opened, before the copy completes
HOLD_S = 60.0  # growth at most while waiting for its gate


def picture(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`base` (C, H, W) uint8 with noise in [-12, 12] on every pixel: a picture of its own."""
    noise = rng.integers(-12, 13, size=base.shape)
    return np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def png(image: np.ndarray, padding: int = 0) -> bytes:
    """(C, H, W) uint8 -> PNG bytes, with a `padding`-byte comment (a tEXt chunk, written before
    the pixels) when > 0: a file big enough to grow for a minute a few bytes at a time."""
    array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    info = PngImagePlugin.PngInfo()
    if padding:
        info.add_text("Comment", "slow copy " * (padding // 10))
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def copy_slowly(path: Path, data: bytes, gate: Path, rng: np.random.Generator, met: dict) -> None:
    """Write `data` to `path` as a slow copy: pieces every PAUSE_S; 80% of it at the nominal pace,
    then a byte at a time until GRACE_S after `gate` appeared (or HOLD_S passed), then the rest.
    Sets met["met_a_reader"] to whether the gate opened while the copy grew."""
    pauses = iter(rng.uniform(*PAUSE_S, size=1000).tolist())
    nominal = rng.uniform(*NOMINAL_S)
    piece = math.ceil(len(data) / (nominal / np.mean(PAUSE_S)))
    held_from, opened, done = None, None, 0
    with open(path, "wb") as handle:
        while done < len(data):
            if done < 0.8 * len(data) or (opened and time.monotonic() - opened >= GRACE_S):
                step = piece
            elif held_from is not None and time.monotonic() - held_from >= HOLD_S:
                step = piece
            else:
                held_from = held_from or time.monotonic()
                step = 1
            handle.write(data[done : done + step])
            handle.flush()
            done += step
            if opened is None and gate.exists():
                opened = time.monotonic()
                met["met_a_reader"] = done < len(data)
            if done < len(data):
                time.sleep(next(pauses))


def main(
    inbox: Path, writer: int, files: int, seconds: float, base: Path, gates: Path, manifest: Path
) -> None:
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
        is_slow = k % SLOW_EVERY == 1
        data = png(image, int(rng.integers(*PADDING)) if is_slow else 0)
        # What ingest will decode: the same pixels, hence the same content id.
        assert np.array_equal(decode_image(data, channels, (height, width)), image), relpath
        entry = {"relpath": relpath, "kind": "slow" if is_slow else "whole"}
        entries.append(entry | {"content_id": content_id(image)})
        if is_slow:
            entries[-1]["met_a_reader"] = False
            gate = gates / relpath.replace("/", "__")
            own = np.random.default_rng(rng.integers(2**32))
            args = (path, data, gate, own, entries[-1])
            slow.append(threading.Thread(target=copy_slowly, args=args))
            slow[-1].start()
        else:
            path.write_bytes(data)
    for thread in slow:
        thread.join()
    manifest.write_text(json.dumps(entries))
    print(f"done {len(entries)}", flush=True)


if __name__ == "__main__":
    inbox, writer, files, seconds, base, gates, manifest = sys.argv[1:8]
    main(
        Path(inbox),
        int(writer),
        int(files),
        float(seconds),
        Path(base),
        Path(gates),
        Path(manifest),
    )
