"""Image files to gallery pixels: the limits every arriving or query image is held to, and how
each PIL mode becomes the gallery's channels. Ingest and `fct search --image` both decode
through `decode_image`, so an item and a query made from the same file get the same pixels.

The limits, checked before any pixel is decoded: a file above MAX_FILE_BYTES is not read; the
width and height come from the header (`Image.open` reads nothing more), and an image above
MAX_PIXELS (or PIL's own decompression-bomb limit) is refused before `load`.

How a mode becomes the gallery's L (1 channel) or RGB (3 channels), in this order; values are
rounded half up. The gallery's background is black (0): Fashion-MNIST and MNIST items are light
shapes on black, and black is what the models saw around every training item.

    mode                          conversion
    1                             0 -> 0, 1 -> 255
    L, RGB                        as is
    I;16, I;16B, I;16L, I;16N     v in 0..65535 -> v * 255 / 65535
    I (PGM/PPM)                   PIL scales maxval to 65535: as I;16
    I (TIFF)                      v in 0..2^bits - 1 (unsigned) or 0..2^(bits-1) - 1 (signed)
                                  -> v * 255 / max; a negative value is refused
    F                             v in 0..1 -> v * 255; a value outside 0..1 (or NaN) is refused
    P                             palette expanded to RGB
    LA, RGBA, PA; 1/P/L/RGB/I;16  alpha composited onto the background: c * a / 255 + bg *
      with a transparent colour   (255 - a) / 255 (the transparent colour has a = 0)
    CMYK                          R = (255 - C) (255 - K) / 255, G and B likewise with M and Y
    YCbCr                         JPEG's (ITU-R BT.601, full range): R = Y + 1.402 (Cr - 128),
                                  G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128),
                                  B = Y + 1.772 (Cb - 128), clipped to 0..255
    then RGB -> L                 ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B (PIL's)
    then L -> RGB                 the grey value in each channel

Any other mode (LAB, HSV, signed 16-bit I;16S, premultiplied La/RGBa, ...) is refused with one
line naming it. An image at another size than the gallery's is then resized bilinearly.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# PIL refuses images above ~89 MP (decompression bombs); an item is a photo, not a poster.
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 * 2**20  # a bigger file is refused unread (a 2 GB "image" is not a photo)
# Decoders PIL may use: raster formats parsed in Python or libpng/libjpeg/libtiff/libwebp. Never
# EPS/PS (they run Ghostscript) nor the long tail of rare parsers.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
BACKGROUND = 0  # the gallery's background, black: see the module docstring
# How each allowed format's files start. A file that starts so (or is shorter than its
# signature and matches it so far) but does not decode may be a file still being written.
SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "WEBP": (b"RIFF",),
    "PPM": (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"Pf", b"PF"),
}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """An image file that cannot become gallery pixels (one line saying why)."""


class IncompleteImage(ImageError):
    """An empty file, or one that starts like an image of an allowed format but does not decode:
    it may still be being written (the inbox tries it again on a later tick)."""


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file; raises ImageError, reading nothing, for something that is not
    a regular file (a FIFO would block, a device never end) or a file above MAX_FILE_BYTES."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{info.st_size:,} bytes, more than {MAX_FILE_BYTES:,}; not read")
    with open(path, "rb") as handle:
        blob = handle.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows meanwhile
    if len(blob) > MAX_FILE_BYTES:
        raise ImageError(f"more than {MAX_FILE_BYTES:,} bytes (growing); not read")
    return blob


def decode_image(blob: bytes, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Image file bytes -> (C, H, W) uint8 at the gallery's size and channels, converted as the
    module docstring's table says (resized bilinearly when the size differs); raises ImageError
    (IncompleteImage for a file that may still be being written) with a one-line reason."""
    if not blob:
        raise IncompleteImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(blob), formats=FORMATS)
            if img.width * img.height > MAX_PIXELS:  # from the header: nothing decoded yet
                raise ImageError(f"{img.width}x{img.height} pixels, more than {MAX_PIXELS:,}")
            img.load()
    except ImageError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        bomb = isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning)
        started = None if bomb else _started_as(blob)
        if "cannot identify image file" in reason:
            reason = (
                f"starts as {started} but does not decode"
                if started
                else f"not an image of {'/'.join(FORMATS)} (starts with {bytes(blob[:8])!r})"
            )
        if started:
            raise IncompleteImage(f"unreadable image ({reason})") from None
        raise ImageError(f"unreadable image ({reason})") from None
    img = to_gallery_mode(img, channels)
    h, w = size
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), Image.BILINEAR)
    array = np.asarray(img)
    return array[None] if channels == 1 else np.transpose(array, (2, 0, 1)).copy()


def _started_as(blob: bytes) -> str | None:
    """The allowed format whose signature `blob` starts with (or, shorter, begins), if any."""
    for name, signatures in SIGNATURES.items():
        for sig in signatures:
            if blob.startswith(sig) or sig.startswith(blob):
                if name == "WEBP" and len(blob) >= 12 and blob[8:12] != b"WEBP":
                    continue  # RIFF holds WAV and AVI too
                return name
    return None


def to_gallery_mode(img: Image.Image, channels: int) -> Image.Image:
    """A decoded image in the gallery's mode, L (channels 1) or RGB (3), converted as the module
    docstring's table says; raises ImageError naming a mode that has no faithful conversion."""
    mode = img.mode
    transparent = "transparency" in img.info
    if mode == "PA" or (mode in ("1", "P", "L", "RGB") and transparent):
        img = img.convert("RGBA")  # PIL turns the transparent colour or index into alpha 0
    elif mode == "1":
        img = img.convert("L")
    elif mode in SIXTEEN_BIT or mode in ("I", "F"):
        grey, alpha = _scaled(img)
        img = Image.fromarray(_composite(grey, alpha) if alpha is not None else grey)
    elif mode == "P":
        img = img.convert("RGB")
    elif mode == "RGBX":
        img = img.convert("RGB")  # X is padding
    elif mode == "CMYK":
        cmyk = np.asarray(img).astype(np.float64)
        rgb = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
        img = Image.fromarray(_round(rgb))
    elif mode == "YCbCr":
        y, cb, cr = np.moveaxis(np.asarray(img).astype(np.float64), -1, 0)
        rgb = np.stack(
            [
                y + 1.402 * (cr - 128),
                y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                y + 1.772 * (cb - 128),
            ],
            axis=-1,
        )
        img = Image.fromarray(_round(np.clip(rgb, 0, 255)))
    if img.mode in ("LA", "RGBA"):
        array = np.asarray(img).astype(np.float64)
        out = _composite(array[..., :-1], array[..., -1:])
        img = Image.fromarray(out[..., 0] if img.mode == "LA" else out)
    if img.mode not in ("L", "RGB"):
        raise ImageError(
            f"mode {mode} has no faithful conversion to {'L' if channels == 1 else 'RGB'}"
            " (converted: 1, L, LA, I;16, I, F, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr)"
        )
    return img.convert("L" if channels == 1 else "RGB")


def _scaled(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A 16-bit, 32-bit integer or float image as uint8 grey by its type's value range, and its
    alpha (0 where the transparent value is, else 255) when it has a transparent value."""
    values = np.asarray(img)
    mode = img.mode
    if mode == "F":
        top, what = 1.0, "0..1"
        if not np.isfinite(values).all():
            raise ImageError("mode F with NaN or infinite values: no faithful conversion")
    elif mode in SIXTEEN_BIT or img.format == "PPM":
        top, what = 65535.0, "16-bit"  # PIL scales a PGM/PPM of maxval > 255 to 0..65535
    elif mode == "I" and img.format == "TIFF":
        bits = img.tag_v2.get(258, (32,))[0]
        signed = img.tag_v2.get(339, (1,))[0] == 2
        top = float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
        what = f"{bits}-bit {'signed' if signed else 'unsigned'} TIFF"
    else:
        raise ImageError(f"mode {mode} from {img.format}: its value range is unknown")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > top:
        raise ImageError(
            f"mode {mode} ({what}) with values {low:g}..{high:g} outside 0..{top:g}:"
            " no faithful conversion"
        )
    grey = _round(values.astype(np.float64) * 255 / top)
    if "transparency" not in img.info:
        return grey, None
    alpha = np.where(values == img.info["transparency"], 0.0, 255.0)
    return grey, alpha


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour (any channels) with alpha 0..255 composited onto the background, as uint8."""
    color = color.astype(np.float64)
    return _round((color * alpha + BACKGROUND * (255 - alpha)) / 255)


def _round(values: np.ndarray) -> np.ndarray:
    """Half up to uint8 (values already within 0..255)."""
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.uint8)
