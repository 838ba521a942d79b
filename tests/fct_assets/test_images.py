"""Image files to gallery pixels (fct_assets/lib/images.py): every PIL mode a decoder gives,
saved in a real format and decoded, against values worked out by hand from the module's table;
the limits; and `fct search --image` held to the same limits and conversions."""

from __future__ import annotations

import io
import zlib

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fct_assets.lib import storage
from fct_assets.lib.images import (
    MAX_FILE_BYTES,
    ImageError,
    IncompleteImage,
    decode_image,
    read_image_file,
)
from fct_assets.serving import search


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def grey(blob: bytes) -> list[list[int]]:
    """The file as a 1-channel gallery's 2x2 item."""
    return decode_image(blob, 1, (2, 2))[0].tolist()


def colour(blob: bytes) -> list[list[list[int]]]:
    """The file as a 3-channel gallery's 2x2 item, pixel by pixel [[r, g, b], ...]."""
    return np.transpose(decode_image(blob, 3, (2, 2)), (1, 2, 0)).tolist()


def test_bilevel_and_grey_images():
    bits = Image.frombytes("1", (2, 2), bytes([0b01000000, 0b10000000]))  # 0 1 / 1 0
    assert grey(encoded(bits, "PNG")) == [[0, 255], [255, 0]]
    # White transparent (PNG tRNS): composited onto black like any alpha.
    assert grey(encoded(bits, "PNG", transparency=1)) == [[0, 0], [0, 0]]
    plain = Image.frombytes("L", (2, 2), bytes([0, 50, 100, 200]))
    assert grey(encoded(plain, "PNG")) == [[0, 50], [100, 200]]
    # A grey item in a colour gallery: the grey value in each channel.
    assert colour(encoded(plain, "PNG")) == [[[0, 0, 0], [50, 50, 50]], [[100] * 3, [200] * 3]]


def test_16_bit_images_are_scaled_by_their_range_not_clipped():
    # v * 255 / 65535, half up: 257 -> 1, 1000 -> 3.89 -> 4, 65535 -> 255.
    deep = Image.fromarray(np.array([[0, 257], [1000, 65535]], dtype=np.uint16))
    blob = encoded(deep, "PNG")
    assert Image.open(io.BytesIO(blob)).mode == "I;16"
    assert grey(blob) == [[0, 1], [4, 255]]
    assert colour(blob)[1] == [[4, 4, 4], [255, 255, 255]]
    # Big-endian 16-bit (TIFF keeps I;16B): 32896 = 128 * 257 -> 128, 514 -> 2.
    big = Image.frombytes("I;16B", (2, 2), np.array([0, 32896, 65535, 514], ">u2").tobytes())
    blob = encoded(big, "TIFF")
    assert Image.open(io.BytesIO(blob)).mode == "I;16B"
    assert grey(blob) == [[0, 128], [255, 2]]
    # A 16-bit ramp keeps its 256 levels (clipping left 0 and 255 and almost nothing between).
    ramp = Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16))
    levels = decode_image(encoded(ramp, "PNG"), 1, (16, 16))
    assert levels.reshape(-1).tolist() == list(range(256))


def test_32_bit_and_float_images_are_scaled_by_their_type_or_refused():
    # A PGM of maxval 1023: PIL scales it to 0..65535 (mode I); then as 16-bit.
    pgm = b"P5 2 2 1023\n" + np.array([0, 341, 682, 1023], ">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert grey(pgm) == [[0, 85], [170, 255]]
    # A 32-bit signed TIFF: v * 255 / (2**31 - 1); 2**30 -> 127.5000001 -> 128, 16843009 -> 2.
    wide = np.array([[0, 2**31 - 1], [2**30, 16843009]], dtype=np.int32)
    assert grey(encoded(Image.fromarray(wide), "TIFF")) == [[0, 255], [128, 2]]
    negative = Image.fromarray(np.array([[0, -5], [300, 7]], dtype=np.int32))
    with pytest.raises(ImageError, match=r"^mode I \(32-bit signed TIFF\) with values -5\.\.300"):
        grey(encoded(negative, "TIFF"))
    # Float: 0..1 -> 0..255; 0.25 -> 63.75 -> 64, 0.5 -> 127.5 -> 128 (half up).
    unit = Image.fromarray(np.array([[0, 0.25], [0.5, 1.0]], dtype=np.float32))
    assert grey(encoded(unit, "TIFF")) == [[0, 64], [128, 255]]
    hdr = Image.fromarray(np.array([[0, 0.5], [2.0, 1.0]], dtype=np.float32))
    with pytest.raises(ImageError, match=r"^mode F \(0\.\.1\) with values 0\.\.2 outside 0\.\.1"):
        grey(encoded(hdr, "TIFF"))


def test_alpha_is_composited_onto_the_black_background():
    # c * a / 255: 200 at alpha 128 -> 100.4 -> 100; alpha 0 -> 0; 10 at alpha 51 -> 2.
    la = Image.frombytes("LA", (2, 2), bytes([200, 128, 255, 0, 100, 255, 10, 51]))
    assert grey(encoded(la, "PNG")) == [[100, 0], [100, 2]]
    rgba = Image.frombytes(
        "RGBA", (2, 2), bytes([255, 0, 0, 255, 0, 255, 0, 128, 10, 20, 30, 0, 200, 100, 50, 51])
    )
    blob = encoded(rgba, "PNG")
    assert colour(blob) == [[[255, 0, 0], [0, 128, 0]], [[0, 0, 0], [40, 20, 10]]]
    # Then luma, 0.299 R + 0.587 G + 0.114 B: 76.2 -> 76, 75.1 -> 75, 0, 24.8 -> 25.
    assert grey(blob) == [[76, 75], [0, 25]]
    # A transparent grey (PNG tRNS) is composited as alpha 0: 50 -> 0.
    keyed = Image.frombytes("L", (2, 2), bytes([0, 50, 100, 200]))
    assert grey(encoded(keyed, "PNG", transparency=50)) == [[0, 0], [100, 200]]
    # So is a transparent 16-bit value: 1000 -> 0; 500 -> 1.95 -> 2.
    deep = Image.fromarray(np.array([[0, 1000], [65535, 500]], dtype=np.uint16))
    assert grey(encoded(deep, "PNG", transparency=1000)) == [[0, 0], [255, 2]]


def test_palettes_are_expanded_and_their_transparent_index_composited():
    pal = Image.new("P", (2, 2))
    pal.putpalette([250, 250, 250, 255, 255, 255, 255, 0, 0])  # 0 near-white, 1 white, 2 red
    pal.putdata([0, 1, 2, 1])
    assert grey(encoded(pal, "PNG")) == [[250, 255], [76, 255]]
    assert colour(encoded(pal, "PNG"))[1] == [[255, 0, 0], [255, 255, 255]]
    for fmt in ("PNG", "GIF"):  # index 0 transparent: black, not near-white
        blob = encoded(pal, fmt, transparency=0)
        assert Image.open(io.BytesIO(blob)).mode == "P"
        assert grey(blob) == [[0, 255], [76, 255]], fmt
        assert colour(blob)[0] == [[0, 0, 0], [255, 255, 255]], fmt
    # Palette + alpha (TIFF keeps PA): white at alpha 128 -> 128; red at 255.
    pa_img = Image.frombytes("PA", (2, 2), bytes([1, 128, 2, 255, 0, 0, 1, 255]))
    pa_img.putpalette([250, 250, 250, 255, 255, 255, 255, 0, 0])
    blob = encoded(pa_img, "TIFF")
    assert Image.open(io.BytesIO(blob)).mode == "PA"
    assert colour(blob) == [[[128, 128, 128], [255, 0, 0]], [[0, 0, 0], [255, 255, 255]]]


def test_colour_images_to_grey_and_print_colours_to_rgb():
    rgb = Image.frombytes("RGB", (2, 2), bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 128, 0]))
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1, 0.587 * 128 = 75.1.
    assert grey(encoded(rgb, "PNG")) == [[76, 150], [29, 75]]
    # CMYK: R = (255 - C)(255 - K) / 255: (100, 0, 0, 50) -> 155 * 205 / 255 = 124.6 -> 125 and
    # 255 * 205 / 255 = 205; no ink -> white; full cyan -> (0, 255, 255); full black -> black.
    cmyk = Image.frombytes(
        "CMYK", (2, 2), bytes([100, 0, 0, 50, 0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255])
    )
    blob = encoded(cmyk, "TIFF")
    assert Image.open(io.BytesIO(blob)).mode == "CMYK"
    assert colour(blob) == [[[125, 205, 205], [255, 255, 255]], [[0, 255, 255], [0, 0, 0]]]
    # Then luma: 0.299 * 125 + 0.701 * 205 = 181.1 -> 181; 0.701 * 255 = 178.8 -> 179.
    assert grey(blob) == [[181, 255], [179, 0]]
    # YCbCr (JPEG's): (100, 128, 128) is grey 100; (81, 90, 240): R = 81 + 1.402 * 112 = 238.0,
    # G = 81 + 0.344136 * 38 - 0.714136 * 112 = 14.1, B = 81 - 1.772 * 38 = 13.7.
    ycc = Image.frombytes(
        "YCbCr", (2, 2), bytes([100, 128, 128, 81, 90, 240, 0, 128, 128, 255, 128, 128])
    )
    blob = encoded(ycc, "TIFF")
    assert Image.open(io.BytesIO(blob)).mode == "YCbCr"
    assert colour(blob) == [[[100, 100, 100], [238, 14, 14]], [[0, 0, 0], [255, 255, 255]]]


def test_a_mode_without_a_faithful_conversion_is_refused_naming_it():
    lab = encoded(Image.new("LAB", (2, 2), (50, 0, 0)), "TIFF")
    assert Image.open(io.BytesIO(lab)).mode == "LAB"
    with pytest.raises(ImageError) as err:
        grey(lab)
    message = str(err.value)
    assert message.startswith("mode LAB has no faithful conversion to L") and "\n" not in message


def test_incomplete_files_are_told_apart_from_other_bad_files():
    png = encoded(Image.frombytes("L", (2, 2), bytes([0, 50, 100, 200])), "PNG")
    for start in (b"", png[:4], png[:30], png[: len(png) // 2]):
        with pytest.raises(IncompleteImage):
            grey(start)
    with pytest.raises(ImageError) as err:
        grey(b"hello, not a picture\n")
    assert not isinstance(err.value, IncompleteImage)
    assert str(err.value).startswith("unreadable image (not an image of PNG/JPEG")


def test_the_file_size_limit_reads_nothing(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match=r"^67,108,865 bytes, more than 67,108,864; not read$"):
        read_image_file(huge)


def blank_png(width: int, height: int) -> bytes:
    """A valid, all-black 8-bit grey PNG of width x height (compressed row by row: small)."""
    z = zlib.compressobj(1)
    row = b"\0" * (width + 1)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.fixture
def gallery_db(tmp_path):
    """A LanceDB folder whose gallery_store holds one 8x8 grey item (what a query is sized to)."""
    db = lancedb.connect(str(tmp_path / "lancedb"))
    image = storage.encode_png(np.zeros((1, 8, 8), np.uint8))
    db.create_table(
        storage.GALLERY_STORE, pa.table({"item_id": [1], "image": pa.array([image], pa.binary())})
    )
    return db


def query(db, path) -> np.ndarray:
    return search._query_image(db, image=str(path), item_id=None, channels=1)


def test_search_image_is_held_to_ingests_limits(gallery_db, tmp_path):
    # 100 megapixels of black, a valid PNG of 97 KB: refused from its header, never decoded.
    poster = tmp_path / "poster.png"
    poster.write_bytes(blank_png(10_000, 10_000))
    with pytest.raises(ValueError) as err:
        query(gallery_db, poster)
    message = str(err.value)
    assert message.startswith(f"{poster}: unreadable image (Image size (100000000 pixels)")
    assert "decompression bomb" in message and "\n" not in message
    # Below PIL's own limit but above ingest's 40 MP: the same refusal as ingest's.
    wide = tmp_path / "wide.png"
    wide.write_bytes(blank_png(8_000, 6_000))
    with pytest.raises(ValueError, match=r"wide\.png: 8000x6000 pixels, more than 40,000,000$"):
        query(gallery_db, wide)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=r"huge\.png: 67,108,865 bytes, more than 67,108,864"):
        query(gallery_db, huge)


def test_search_image_is_converted_as_an_arriving_item(gallery_db, tmp_path):
    deep = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257
    deep[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    expected = np.full((1, 8, 8), 128, np.uint8)
    expected[0, 0, 0] = 0
    assert np.array_equal(query(gallery_db, path), expected)
