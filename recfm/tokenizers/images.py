"""Image input handling: one loader for every way an image reaches recfm, and the vision tower's
preprocessing.

Images arrive as PIL images (from Python callers), file paths (domain folders), raw bytes (Arrow
`Image()` features) and `data:` URLs (the chat API's `image_url` parts). All of them go through
`load_image`, so the checks that keep a bad or hostile image from taking the process down live in one
place: the pixel count is read from the header and refused *before* anything is decoded, and
http(s) URLs are never fetched (the server must not be made to reach the network on a user's behalf).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray]

DEFAULT_MAX_PIXELS = 4096 * 4096
# Formats PIL may try. A closed list keeps rarely used, rarely audited decoders out of reach of
# untrusted input; it covers what item catalogues and browsers actually produce.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image; the message says what and where."""


def load_image(x: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return `x` as a fully decoded RGB PIL image.

    `x` may be a PIL image, a path, raw encoded bytes, or a `data:image/...;base64,` URL. Transparent
    images are composited on white (product shots are often transparent PNGs; dropping alpha would
    leave them on black). Raises ImageError for anything else, including images of more than
    `max_pixels` pixels (checked from the header, before decoding). PIL's own global limit,
    `Image.MAX_IMAGE_PIXELS`, still applies on top when it is the smaller one.
    """
    if isinstance(x, Image.Image):
        _check_pixels(x.size, max_pixels, "image")
        return _to_rgb(x)
    if isinstance(x, (bytes, bytearray)):
        return _decode(io.BytesIO(bytes(x)), "image bytes", max_pixels)
    if isinstance(x, str) and x.startswith("data:"):
        return _decode(io.BytesIO(_data_url_bytes(x)), "data URL", max_pixels)
    if isinstance(x, str) and x.split(":", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise ImageError(f"refusing to fetch {x[:80]!r}: URLs are never fetched; "
                         "pass a local path, bytes or a data: URL")
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        with open(path, "rb") as f:
            return _decode(f, f"image file {path}", max_pixels)
    raise ImageError(f"cannot load an image from a {type(x).__name__}; expected a PIL image, "
                     "a path, bytes or a data: URL")


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError(f"bad data URL {url[:40]!r}...: expected 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"bad data URL: its base64 payload does not decode ({e})") from None


def _decode(fp, where: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=FORMATS)  # reads the header only
            _check_pixels(im.size, max_pixels, where)
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{where} is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where} is not an image in a supported format "
                         f"({', '.join(FORMATS)}), or is corrupt") from None
    except (OSError, SyntaxError, EOFError, ValueError, IndexError) as e:
        raise ImageError(f"{where} is corrupt or truncated: {e}") from None
    return _to_rgb(im)


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{where} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                         "(possible decompression bomb)")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.getexif().get(0x0112, 1) != 1:  # phone photos store their rotation in EXIF
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Vision-tower preprocessing


def build_image_processor(kind: str = "clip", image_size: int = 224, **kwargs):
    """A transformers image processor for a CLIP or SigLIP vision tower, built from arguments.

    Nothing is downloaded: a local checkpoint's `preprocessor_config.json` is the alternative when one
    exists. CLIP resizes the shortest edge and centre-crops (keeps aspect ratio, loses the margins);
    SigLIP resizes straight to a square, as those models were trained. `kwargs` override any processor
    option (`image_mean`, `do_center_crop`, ...). The torchvision backend is used when torchvision is
    installed, the PIL one otherwise; both give the same tensors.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    suffix = "" if is_torchvision_available() else "Pil"
    if kind == "clip":
        cls = getattr(transformers, "CLIPImageProcessor" + suffix)
        args = dict(size={"shortest_edge": image_size},
                    crop_size={"height": image_size, "width": image_size}, do_center_crop=True)
    elif kind == "siglip":
        cls = getattr(transformers, "SiglipImageProcessor" + suffix)
        args = dict(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown image processor kind {kind!r}; expected 'clip' or 'siglip'")
    return cls(**{**args, **kwargs})


def preprocess(images: list[ImageInput], processor,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.FloatTensor:
    """Load each input with `load_image` and run `processor`: a float tensor (B, 3, H, W)."""
    pil = [load_image(x, max_pixels=max_pixels) for x in images]
    return processor(pil, return_tensors="pt")["pixel_values"]


def to_pixels(x: ImageInput, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Load (with `load_image`'s checks) and resize (squash, no crop: the whole item stays in view) to
    size x size: a uint8 tensor (3, size, size)."""
    arr = np.asarray(load_image(x, max_pixels).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_tensor(images: list[ImageInput], size: int) -> torch.Tensor:
    """`to_pixels` of each image, stacked as a float tensor in [0, 1] of shape (B, 3, size, size).
    Used by the VQ tokenizer."""
    return torch.stack([to_pixels(x, size) for x in images]).float().div(255)
