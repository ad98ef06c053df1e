"""Input codecs: an uploaded image as a deployed edge sends it, charged at the length of its real bitstream, and the
image the cloud decodes from those bytes.

The encoder is Pillow's, with these settings (so that anyone can reproduce a byte count with Pillow alone):

- ``png``: ``compress_level=6`` (Pillow's default), no ``optimize``; lossless.
- ``jpeg:Q``: ``quality=Q``, 4:2:0 chroma subsampling (``subsampling=2``), baseline (not progressive), no Huffman
  optimisation, no EXIF or ICC data: the JFIF header is part of the count.
- ``webp:Q``: lossy, ``quality=Q``, ``method=4`` (Pillow's default), no metadata.

Each image is encoded on its own: a (C, H, W) float image in [0, 1] becomes the uint8 pixels round(255 x), RGB for
three channels and greyscale for one: exact where images were decoded from uint8 (COCO's letterbox is resized in
float, and is encoded as its uint8 rounding). The
versions of Pillow and of the libraries under it are part of a unit's key (:func:`library_versions`).

Payload rows quantised to int8 may also be entropy-coded (``payload_dtype="int8+zstd"``): each row, its float32 scale
then its int8 symbols, becomes one Zstandard frame (level :data:`ZSTD_LEVEL`, content size written, no checksum, no
dictionary), charged at the frame's length; the cloud receives what the frame decodes to, which is exactly the int8
encoding's values (lossless).
"""
from __future__ import annotations

import io

import numpy as np
import PIL
import torch
import zstandard
from PIL import Image, features

from cemabench.config.codecs import parse_input_codec
from cemabench.protocol import bottleneck

_MODES = {1: "L", 3: "RGB"}
ZSTD_LEVEL = 19


def zstd_rows(symbols: torch.Tensor, scales: torch.Tensor) -> list[bytes]:
    """One Zstandard frame per row: the row's scale (float32, little-endian) then its int8 symbols."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False,
                                          write_dict_id=False)
    q = symbols.reshape(len(symbols), -1).cpu().numpy()
    s = scales.reshape(-1).float().cpu().numpy().astype("<f4")
    return [compressor.compress(s[i].tobytes() + q[i].tobytes()) for i in range(len(q))]


def unzstd_rows(frames: list[bytes], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 symbols (len(frames), *shape) and float32 scales (len(frames),) that the frames decode to."""
    decompressor = zstandard.ZstdDecompressor()
    rows = [np.frombuffer(decompressor.decompress(f), dtype=np.uint8) for f in frames]
    size = int(np.prod(shape, dtype=np.int64))
    if any(len(r) != 4 + size for r in rows):
        raise ValueError(f"a payload frame does not decode to a scale and {size} symbols")
    scales = torch.from_numpy(np.array([r[:4].view("<f4")[0] for r in rows], dtype=np.float32))
    symbols = torch.from_numpy(np.stack([r[4:].view(np.int8) for r in rows]).reshape(len(rows), *shape))
    return symbols, scales


def payload_versions() -> dict[str, str]:
    """The entropy coders' versions, which the bytes of an ``int8+zstd`` or ``entropy`` payload depend on (part of
    every unit's key: a method, not the protocol, chooses the encoding)."""
    return {"zstandard": zstandard.__version__, "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
            **bottleneck.versions()}


def library_versions(codec: str) -> dict[str, str]:
    """The encoder's versions that a codec's byte counts depend on (none for ``raw``)."""
    name, _ = parse_input_codec(codec)
    if name == "raw":
        return {}
    library = {"png": "zlib", "jpeg": "libjpeg_turbo", "webp": "webp"}[name]
    return {"pillow": PIL.__version__, library: str(features.version(library))}


class InputCodec:
    """One codec (``png``, ``jpeg:Q`` or ``webp:Q``): :meth:`__call__` encodes a batch of images and returns what
    the cloud decodes, with each image's encoded length."""

    def __init__(self, codec: str):
        self.codec = codec
        self.name, self.quality = parse_input_codec(codec)
        if self.name == "raw":
            raise ValueError("raw inputs cross as they are: no codec")
        self._options = {"png": {"format": "PNG", "compress_level": 6, "optimize": False},
                         "jpeg": {"format": "JPEG", "quality": self.quality, "subsampling": 2, "optimize": False,
                                  "progressive": False},
                         "webp": {"format": "WEBP", "quality": self.quality, "method": 4, "lossless": False,
                                  }}[self.name]

    def encode(self, image: np.ndarray) -> bytes:
        """The bitstream of one uint8 image (H, W, C)."""
        buffer = io.BytesIO()
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels, _MODES[image.shape[-1]]).save(buffer, **self._options)
        return buffer.getvalue()

    @staticmethod
    def decode(data: bytes, channels: int) -> np.ndarray:
        """The uint8 image (H, W, C) that a bitstream decodes to."""
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert(_MODES[channels]), dtype=np.uint8)
        return pixels.reshape(*pixels.shape[:2], channels)

    def encode_batch(self, images: torch.Tensor) -> list[bytes]:
        """Each image's bitstream, from a float (N, C, H, W) batch in [0, 1] with 1 or 3 channels."""
        if images.dim() != 4 or images.shape[1] not in _MODES:
            raise ValueError(f"input codec {self.codec} encodes images of 1 or 3 channels, (N, C, H, W); these are "
                             f"{tuple(images.shape)}")
        pixels = (images.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)
        return [self.encode(image) for image in pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()]

    def decode_batch(self, streams: list[bytes], like: torch.Tensor) -> torch.Tensor:
        """The images that ``streams`` decode to, as a new tensor with the dtype, device, channels and memory format
        of ``like`` (a batch), in [0, 1]."""
        channels = like.shape[1]
        if not streams:
            return like.new_empty((0, *like.shape[1:]))
        decoded = torch.from_numpy(np.stack([self.decode(s, channels) for s in streams]))
        out = decoded.permute(0, 3, 1, 2).to(like.dtype).div_(255)
        channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
        return out.to(like.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
