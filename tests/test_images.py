"""`read_image`: the DreamBench photos, plus generated awkward and bad files."""
import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from music_dagster.errors import UserError
from music_dagster.images import ImageError, read_image

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="shared/data/dreambench not present")
def test_dreambench_photos():
    photos = sorted(DREAMBENCH.rglob("*.jpg"))
    assert photos
    for p in photos:
        im = read_image(p)
        assert im.mode == "RGB" and im.size == Image.open(p).size


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _gradient(w=32, h=24):
    x = np.linspace(0, 255, w, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (h, 1)), np.full((h, w), 100, np.uint8),
                                     np.tile(x[::-1], (h, 1))], axis=-1))


def test_exif_orientation(tmp_path):
    im = _gradient(32, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path, "o.jpg", im, exif=exif.tobytes(), quality=95)
    out = read_image(path)
    assert out.size == (24, 32)
    expected = np.asarray(im.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).mean() < 8


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255
    a[:, :4, 3] = 255  # left half opaque red, right half transparent
    out = np.asarray(read_image(_save(tmp_path, "a.png", Image.fromarray(a, "RGBA"))))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 7]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), a[..., 3]], -1), "LA")
    out = np.asarray(read_image(_save(tmp_path, "la.png", la)))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 7]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(0, (0, 0, 4, 8))
    path = _save(tmp_path, "p.png", p, transparency=0)
    out = np.asarray(read_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 7]) == (0, 255, 0)
    out = np.asarray(read_image(_save(tmp_path, "p.gif", p)))  # no transparency: palette colours
    assert tuple(out[0, 0]) == (0, 0, 0)


def test_cmyk_and_grayscale(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    out = np.asarray(read_image(_save(tmp_path, "c.jpg", cmyk, quality=95))).astype(int)
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60 and out[4, 4, 2] < 60
    for mode, value in (("L", 77), ("1", 255)):
        out = read_image(_save(tmp_path, f"{mode}.png", Image.new(mode, (8, 8), value)))
        assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (value,) * 3


def test_16bit_uses_actual_range(tmp_path):
    a = np.zeros((4, 16), np.uint16)
    a[:, 8:] = 1000  # a dim 16-bit image: 0 and 1000 out of 65535
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    out = np.asarray(read_image(_save(tmp_path, "d.png", im)))
    assert out[0, 0, 0] == 0 and out[0, 15, 0] == 255
    flat = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(read_image(_save(tmp_path, "f.png", flat)))[0, 0, 0] == 255


def test_float_and_int32_tiff(tmp_path):
    f = Image.fromarray(np.array([[-1.0, 0.0], [0.5, 3.0]], np.float32), "F")
    out = np.asarray(read_image(_save(tmp_path, "f.tif", f)))[..., 0]
    np.testing.assert_array_equal(out, [[0, 64], [96, 255]])
    i = Image.fromarray(np.array([[0, 100000], [50000, 25000]], np.int32), "I")
    out = np.asarray(read_image(_save(tmp_path, "i.tif", i)))[..., 0]
    np.testing.assert_array_equal(out, [[0, 255], [128, 64]])


def _png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _bad_files(tmp_path):
    jpg = io.BytesIO()
    _gradient(64, 64).save(jpg, format="JPEG")
    png = io.BytesIO()
    _gradient(64, 64).save(png, format="PNG")
    files = {
        "empty.png": (b"", "empty file"),
        "text.jpg": (b"hello, I am not an image\n" * 10, "not an image"),
        "cut.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], "truncated"),
        "cut.png": (png.getvalue()[: len(png.getvalue()) // 2], "truncated"),
        "bomb.png": (_png_header_only(10_000, 10_000), "exceeds the limit of 64000000"),
        "giant.png": (_png_header_only(60_000, 60_000), "exceeds limit .*decompression bomb"),  # over Pillow's own 2x limit too
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: match for name, (_, match) in files.items()}


def test_bad_files(tmp_path):
    for name, match in _bad_files(tmp_path).items():
        with pytest.raises(ImageError, match=match) as e:
            read_image(tmp_path / name)
        msg = str(e.value)
        assert isinstance(e.value, UserError) and "\n" not in msg and name in msg, msg
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path)


def test_pixel_limit_is_a_parameter(tmp_path):
    path = _save(tmp_path, "g.png", _gradient(32, 24))
    assert read_image(path, max_pixels=32 * 24).size == (32, 24)
    with pytest.raises(ImageError, match="768 pixels exceeds the limit of 767"):
        read_image(path, max_pixels=32 * 24 - 1)


def test_pillow_global_state_untouched(tmp_path):
    _bad_files(tmp_path)
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for name in ("cut.jpg", "bomb.png"):
        with pytest.raises(ImageError):
            read_image(tmp_path / name)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    # Even when a caller has switched truncated loading on, a truncated file is refused and the switch restored.
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageError, match="truncated"):
            read_image(tmp_path / "cut.jpg")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"]),
       st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_any_mode_round_trips_to_rgb(mode, w, h, seed):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if mode in ("I", "F", "CMYK") else "PNG")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.img"
        path.write_bytes(buf.getvalue())
        out = read_image(path)
    assert out.mode == "RGB" and out.size == (w, h)
