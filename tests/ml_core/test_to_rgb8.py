"""`to_rgb8`: the one colour policy of the server (ingest) and the CLI (`load_image`)."""
import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ml_core.data import is_rgb8, load_image, to_rgb8


def reopen(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def px(im, xy=(0, 0)):
    return to_rgb8(im).getpixel(xy)


def test_16bit_gray_is_scaled_from_its_full_range():
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = reopen(Image.fromarray(a))
    assert im.mode.startswith("I;16")
    out = to_rgb8(im)
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_16bit_big_endian_tiff():
    im = reopen(Image.new("I;16B", (2, 2), 1000), "TIFF")
    assert px(im) == (4, 4, 4)


@pytest.mark.parametrize("mode, value, expected", [
    ("I", 200, (200, 200, 200)),        # 8-bit values in a 32-bit image: as they are
    ("I", 40000, (156, 156, 156)),      # 16-bit values: scaled as 16-bit
    ("F", 0.5, (128, 128, 128)),        # 0..1 floats: times 255
])
def test_integer_and_float_images(mode, value, expected):
    assert px(Image.new(mode, (2, 2), value)) == expected


def test_out_of_range_values_are_stretched_from_min_to_max():
    im = Image.fromarray(np.array([[-5.0, 0.0, 5.0]], dtype=np.float32))
    assert [px(im, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert px(Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32))) == (0, 0, 0)  # flat: no division by zero


def test_transparency_is_composited_on_white():
    assert px(reopen(Image.new("RGBA", (2, 2), (255, 0, 0, 0)))) == (255, 255, 255)
    assert px(reopen(Image.new("RGBA", (2, 2), (255, 0, 0, 255)))) == (255, 0, 0)
    assert px(reopen(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))) == (127, 127, 127)
    assert px(reopen(Image.new("LA", (2, 2), (0, 0)))) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30] * 256)
    assert px(reopen(p)) == (10, 20, 30)
    assert px(reopen(p, transparency=0)) == (255, 255, 255)
    assert px(reopen(Image.new("RGB", (2, 2), (9, 9, 9)), transparency=(9, 9, 9))) == (255, 255, 255)


def test_cmyk_gray_and_bilevel():
    assert px(reopen(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)) == pytest.approx((255, 0, 0), abs=2)
    assert px(reopen(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    assert px(reopen(Image.new("1", (2, 2), 1))) == (255, 255, 255)


def test_exif_orientation_is_applied_and_metadata_dropped():
    im = Image.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6
    src = reopen(im, "JPEG", exif=exif, comment=b"hello")
    assert not is_rgb8(src)
    out = to_rgb8(src)
    assert out.size == (20, 40) and out.info == {}
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 70_000)
    out = to_rgb8(reopen(Image.new("RGB", (4, 4)), pnginfo=info))
    assert out.info == {}
    out.save(io.BytesIO(), "JPEG")  # with the text chunk carried over: "Comment is too long"


def test_is_rgb8():
    assert is_rgb8(reopen(Image.new("RGB", (2, 2))))
    assert not is_rgb8(reopen(Image.new("RGBA", (2, 2))))
    assert not is_rgb8(reopen(Image.new("L", (2, 2))))
    assert not is_rgb8(reopen(Image.new("RGB", (2, 2)), transparency=(0, 0, 0)))


def test_load_image_applies_the_same_conversion(tmp_path):
    a = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    Image.fromarray(a).save(tmp_path / "g16.png")
    t = load_image(tmp_path / "g16.png")
    assert t.shape == (3, 4, 16)
    expected = np.asarray(to_rgb8(Image.open(tmp_path / "g16.png"))).astype(np.float32) / 255
    assert np.allclose(t.permute(1, 2, 0).numpy(), expected)
    assert t[0, 0, 0] == 0 and t[0, 0, -1] == 1 and 0.4 < float(t[0, 0, 8]) < 0.6  # not all white
    rgb = Image.new("RGB", (3, 2), (10, 20, 30))
    rgb.save(tmp_path / "rgb.png")
    assert np.allclose(load_image(tmp_path / "rgb.png")[:, 0, 0].numpy(), np.array([10, 20, 30]) / 255)
