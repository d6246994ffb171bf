import base64
import io
import re
import struct
import zlib

import pytest
from PIL import Image

from recfm.tokenizers.images import ImageError, build_image_processor, load_image, preprocess


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but that holds almost no data: a decompression bomb
    as far as any header check is concerned, and tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def red() -> Image.Image:
    return Image.new("RGB", (20, 10), (255, 0, 0))


def test_load_from_pil_path_bytes_and_data_url(red, tmp_path):
    path = tmp_path / "red.png"
    red.save(path)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(red)).decode()
    for x in (red, path, str(path), png_bytes(red), data_url):
        im = load_image(x)
        assert im.mode == "RGB" and im.size == (20, 10) and im.getpixel((3, 3)) == (255, 0, 0)


def test_grey_and_transparent_images_become_rgb_on_white():
    assert load_image(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
    clear = png_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_corrupt_and_non_image_bytes(red, tmp_path):
    big = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(big[: len(big) // 2])
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*supported format"):
        load_image(path)


def test_unsupported_format_is_refused(red):
    buf = io.BytesIO()
    red.save(buf, "PPM")  # PIL reads PPM, but it is not on recfm's list
    with pytest.raises(ImageError, match="supported format"):
        load_image(buf.getvalue())


def test_decompression_bombs_are_refused_before_decoding(red):
    # 5000x5000 is under PIL's own limit: recfm's header check (max_pixels) must catch it.
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(png_with_header_size(5000, 5000))
    # 20000x20000 trips PIL's DecompressionBombError, which must come out as an ImageError.
    with pytest.raises(ImageError, match="too large"):
        load_image(png_with_header_size(20000, 20000))
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(png_bytes(red), max_pixels=100)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(red, max_pixels=100)


def test_urls_are_never_fetched_and_bad_data_urls_are_refused():
    for url in ("http://example.com/a.png", "https://example.com/a.png", "file:///etc/passwd"):
        with pytest.raises(ImageError, match="never fetched"):
            load_image(url)
    for url in ("data:image/png;base64,@@@", "data:text/plain;base64,aGk=", "data:image/png,raw"):
        with pytest.raises(ImageError, match="data URL"):
            load_image(url)
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(3)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_processor_output_shape(kind, red, tmp_path):
    path = tmp_path / "red.jpg"
    red.save(path)
    processor = build_image_processor(kind, image_size=32)
    x = preprocess([red, path, png_bytes(Image.new("RGB", (50, 80), "blue"))], processor)
    assert x.shape == (3, 3, 32, 32) and x.dtype.is_floating_point
    with pytest.raises(ImageError):
        preprocess([tmp_path / "missing.png"], processor)


def test_unknown_processor_kind():
    with pytest.raises(ValueError, match="clip"):
        build_image_processor("resnet")
