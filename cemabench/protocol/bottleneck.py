"""The ``entropy`` payload encoding: a learned bottleneck's integer symbols, entropy-coded by the harness.

A method with a learned bottleneck (an entropy model fixed by its offline training stage) declares the model's tables
(:class:`~cemabench.method.EntropyTables`, from ``Method.entropy_tables``); the harness reads and checks them once
per run unit, before the stream, and keeps its own copy, so nothing online can change them (the tables are not
charged: they are part of the deployed model, sent once, offline). Online the edge hands int32 symbols, one row
(C, ...) per uploaded sample; the harness codes each row into one bitstream, charges that bitstream's length,
decodes it, and gives the cloud exactly the decoded symbols. The edge never states a length: what is charged is what
the harness wrote (issue 22's trust boundary).

The coder is `constriction <https://bamler-lab.github.io/constriction/>`_'s range coder
(``constriction.stream.queue.RangeEncoder``: 32-bit words, 24-bit model precision). Each symbol of channel c is coded
with the categorical model of that channel's frequencies plus one escape symbol (``Categorical(p, perfect=False)``
with p = (frequencies[c], escape[c]) / their sum; constriction's own fixed-point quantisation, which gives every
entry a nonzero probability). The channels of a row are coded in order (channel 0's symbols, in C order, first).
A value outside the table's range, or of frequency 0, is escaped: the escape symbol, then after all of the row's
table symbols the escaped values in order, each as z = its zig-zag code (2v for v >= 0, -2v - 1 below) written as
Elias gamma of z + 1 with uniform models: n = bit_length(z + 1) - 1 (uniform over 0..32), then the n low bits of
z + 1 in chunks of at most 16 bits (uniform each). So every int32 value crosses exactly; nothing is clamped.

A row's bytes are 4 x the number of 32-bit words the encoder wrote (``get_compressed().nbytes``): the bitstream as
the decoder reads it. What a deployed link adds per sample (a length prefix or a packet boundary, so that a receiver
knows where one bitstream ends) is not charged, as for the input codecs' bitstreams; the row's shape is the deployed
model's (fixed by its architecture and the input size), known to both halves.
"""
from __future__ import annotations

import numpy as np
import torch

from cemabench.method import EntropyTables

MAX_CHANNELS = 4096
MAX_SYMBOLS = 4096  # table columns per channel
MAX_FREQUENCY = 2 ** 31 - 1
_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_CHUNK = 16  # bits per uniform chunk of an escaped value


def _constriction():
    import constriction  # imported where it is used: only the entropy payload needs it
    return constriction


def versions() -> dict[str, str]:
    """The coder's version, which the bytes of an ``entropy`` payload depend on."""
    from importlib.metadata import version
    return {"constriction": version("constriction")}


class EntropyCoder:
    """The harness's copy of a method's checked :class:`EntropyTables`, and the coding of rows of symbols with it."""

    def __init__(self, tables: EntropyTables):
        self.frequencies, self.offsets, self.escape = check_tables(tables)
        self.channels, self.width = self.frequencies.shape
        model = _constriction().stream.model
        self._models = []
        for c in range(self.channels):
            counts = np.append(self.frequencies[c], self.escape[c]).astype(np.float64)
            self._models.append(model.Categorical(counts / counts.sum(), perfect=False))
        self._bits = model.Uniform(33)

    def _check(self, rows: torch.Tensor, what: str) -> None:
        if rows.dtype != torch.int32:
            raise ValueError(f"{what} must hold int32 symbols under payload_dtype 'entropy', got {rows.dtype}")
        if rows.dim() < 2 or rows.shape[1] != self.channels:
            raise ValueError(f"{what} must be rows (n, C, ...) with C = {self.channels}, the channels of the method's "
                             f"entropy tables; got shape {tuple(rows.shape)}")

    def encode_rows(self, rows: torch.Tensor, what: str = "the payload") -> list[bytes]:
        """One bitstream per row of int32 symbols (n, C, ...)."""
        self._check(rows, what)
        values = rows.detach().cpu().numpy().reshape(len(rows), self.channels, -1).astype(np.int64)
        return [self._encode_row(row) for row in values]

    def _encode_row(self, row: np.ndarray) -> bytes:
        coder = _constriction().stream.queue.RangeEncoder()
        escaped = []
        for c in range(self.channels):
            index = row[c] - self.offsets[c]
            inside = (index >= 0) & (index < self.width)
            direct = np.zeros_like(inside)
            direct[inside] = self.frequencies[c][index[inside]] > 0
            symbols = np.where(direct, index, self.width).astype(np.int32)
            coder.encode(symbols, self._models[c])
            escaped.append(row[c][~direct])
        for value in np.concatenate(escaped):
            self._encode_escaped(coder, int(value))
        return coder.get_compressed().tobytes()

    def _encode_escaped(self, coder, value: int) -> None:
        z = 2 * value if value >= 0 else -2 * value - 1
        word = z + 1
        n = word.bit_length() - 1
        coder.encode(np.array([n], dtype=np.int32), self._bits)
        uniform = _constriction().stream.model.Uniform
        while n > 0:
            k = min(n, _CHUNK)
            n -= k
            coder.encode(np.array([(word >> n) & ((1 << k) - 1)], dtype=np.int32), uniform(2 ** k))

    def decode_rows(self, streams: list[bytes], shape: tuple[int, ...]) -> torch.Tensor:
        """The int32 symbols (len(streams), *shape) that the bitstreams decode to."""
        size = int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((len(streams), self.channels, size), dtype=np.int64)
        for i, stream in enumerate(streams):
            out[i] = self._decode_row(stream, size)
        return torch.from_numpy(out.astype(np.int32).reshape(len(streams), *shape))

    def _decode_row(self, stream: bytes, size: int) -> np.ndarray:
        decoder = _constriction().stream.queue.RangeDecoder(np.frombuffer(stream, dtype=np.uint32).copy())
        row = np.empty((self.channels, size), dtype=np.int64)
        escapes = []
        for c in range(self.channels):
            symbols = np.asarray(decoder.decode(self._models[c], size), dtype=np.int64)
            row[c] = symbols + self.offsets[c]
            escapes += [(c, j) for j in np.flatnonzero(symbols == self.width)]
        for c, j in escapes:
            row[c, j] = self._decode_escaped(decoder)
        return row

    def _decode_escaped(self, decoder) -> int:
        n = int(decoder.decode(self._bits, 1)[0])
        word, uniform = 1, _constriction().stream.model.Uniform
        while n > 0:
            k = min(n, _CHUNK)
            n -= k
            word = (word << k) | int(decoder.decode(uniform(2 ** k), 1)[0])
        z = word - 1
        return z // 2 if z % 2 == 0 else -(z + 1) // 2


def check_tables(tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tables as int64 arrays (frequencies (C, K), offsets (C,), escape (C,)), or ValueError naming what is wrong.
    """
    where = "Method.entropy_tables()"
    if type(tables) is not EntropyTables:
        raise ValueError(f"{where} must return an EntropyTables (not a subclass) or None, got "
                         f"{type(tables).__module__}.{type(tables).__qualname__}")
    arrays = []
    for name in ("frequencies", "offsets", "escape"):
        t = getattr(tables, name)
        if type(t) is not torch.Tensor or t.layout is not torch.strided or t.is_quantized or t.is_meta:
            raise ValueError(f"{where}.{name} must be a plain dense torch.Tensor, got {type(t).__qualname__}")
        if t.dtype != torch.int64:
            raise ValueError(f"{where}.{name} must be int64 (integer frequencies and offsets), got {t.dtype}")
        arrays.append(t.detach().cpu().numpy().astype(np.int64, copy=True))
    frequencies, offsets, escape = arrays
    if frequencies.ndim != 2 or not (1 <= frequencies.shape[0] <= MAX_CHANNELS) or \
            not (1 <= frequencies.shape[1] <= MAX_SYMBOLS):
        raise ValueError(f"{where}.frequencies must be (C, K) with 1 <= C <= {MAX_CHANNELS} and 1 <= K <= "
                         f"{MAX_SYMBOLS}, got shape {frequencies.shape}")
    channels, width = frequencies.shape
    if offsets.shape != (channels,) or escape.shape != (channels,):
        raise ValueError(f"{where}: offsets and escape must be ({channels},), one per channel, got {offsets.shape} "
                         f"and {escape.shape}")
    if frequencies.min() < 0 or frequencies.max() > MAX_FREQUENCY:
        raise ValueError(f"{where}.frequencies must be in [0, {MAX_FREQUENCY}]")
    if escape.min() < 1 or escape.max() > MAX_FREQUENCY:
        raise ValueError(f"{where}.escape must be in [1, {MAX_FREQUENCY}] (an escape of frequency 0 could code "
                         f"no value outside the table)")
    if offsets.min() < _INT32[0] or offsets.max() + width - 1 > _INT32[1]:
        raise ValueError(f"{where}: every channel's range offsets[c] .. offsets[c] + K - 1 must be int32 values")
    return frequencies, offsets, escape
