"""The compact binary form of a program, with a version header and a CRC32.

Layout (little endian):

    offset 0   magic      6 bytes  b"EPCNC\\0"
           6   version    u16      format version (isa.format_version of the program)
           8   flags      u16      0 (reserved)
          10   text_len   u32      bytes of the compressed skeleton
          14   data_len   u32      bytes of the packed memory words
          18   skeleton   zlib-compressed assembly text without memory contents
               data       every constant memory's words in declaration order, each word
                          `bits` wide two's complement, bit-packed LSB first (a 4-bit
                          weight takes half a byte), each memory padded to a whole byte
     end-4     crc32      u32      CRC32 of all bytes before it

The skeleton reuses the assembler's grammar, so the binary and the text cannot disagree
on what a program means. A truncated, bit-flipped or newer-version file is refused with
one EpcError naming the file.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from epc.compiler.errors import EpcError

from .assembler import assemble, disassemble
from .isa import ISA_VERSION, MAGIC, Program, format_version
from .size import check_program_memory

_HEAD = struct.Struct("<6sHHII")


def pack_words(values: np.ndarray, bits: int) -> bytes:
    """Bit-pack integers (two's complement, `bits` wide, LSB first)."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    u = (v & ((1 << bits) - 1)).astype(np.uint64)
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


UNPACK_CHUNK = 1 << 16     # words unpacked at a time: the bit planes take 8 bytes a bit


def unpack_words(buf: bytes, n: int, bits: int, signed: bool) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8)
    out = np.empty(n, dtype=np.int64)
    shifts = np.arange(bits, dtype=np.int64)
    # a chunk of UNPACK_CHUNK words starts on a byte boundary (UNPACK_CHUNK * bits % 8 == 0)
    for start in range(0, n, UNPACK_CHUNK):
        k = min(UNPACK_CHUNK, n - start)
        b0 = start * bits // 8
        planes = np.unpackbits(raw[b0:b0 + (k * bits + 7) // 8], bitorder="little")[:k * bits]
        out[start:start + k] = (planes.reshape(k, bits).astype(np.int64) << shifts).sum(1)
    if signed:
        out = np.where(out >= (1 << (bits - 1)), out - (1 << bits), out)
    return out


def to_bytes(prog: Program) -> bytes:
    text = zlib.compress(disassemble(prog, data=False).encode("utf-8"), 9)
    data = b"".join(pack_words(m.data, m.bits) for m in prog.memories if m.data is not None)
    body = _HEAD.pack(MAGIC, format_version(prog), 0, len(text), len(data)) + text + data
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def from_bytes(buf: bytes, source: str = "<program>") -> Program:
    if len(buf) < _HEAD.size + 4:
        raise EpcError(f"{source}: truncated neuromorphic program ({len(buf)} bytes)")
    magic, version, flags, tlen, dlen = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise EpcError(f"{source}: not a neuromorphic program (bad magic bytes)")
    if version > ISA_VERSION:
        raise EpcError(f"{source}: program format version {version} is newer than this epc "
                       f"reads (up to {ISA_VERSION}); upgrade epc")
    if version < 1:
        raise EpcError(f"{source}: bad program format version {version}")
    want = _HEAD.size + tlen + dlen + 4
    if len(buf) != want:
        raise EpcError(f"{source}: truncated or padded program: {len(buf)} bytes, header "
                       f"says {want}")
    (crc,) = struct.unpack_from("<I", buf, len(buf) - 4)
    if zlib.crc32(buf[:-4]) & 0xFFFFFFFF != crc:
        raise EpcError(f"{source}: CRC32 mismatch: the program is corrupted (re-compile it)")
    if flags != 0:
        raise EpcError(f"{source}: unknown flags {flags:#x} in the program header")
    try:
        # the skeleton is text of about the program's size: a stream that inflates past
        # 64x the file (a zip bomb in the CRC-valid header) is refused
        d = zlib.decompressobj()
        raw = d.decompress(buf[_HEAD.size:_HEAD.size + tlen], 64 * len(buf) + (1 << 20))
        if d.unconsumed_tail or not d.eof:
            raise EpcError(f"{source}: corrupt program skeleton ("
                           + ("truncated" if not d.unconsumed_tail else
                              f"it inflates past {64 * len(buf) + (1 << 20):,} bytes") + ")")
        text = raw.decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as e:
        raise EpcError(f"{source}: corrupt program skeleton ({e})")
    prog = assemble(text, source=f"{source}:skeleton")
    check_program_memory(prog, source)
    data = buf[_HEAD.size + tlen:_HEAD.size + tlen + dlen]
    pos = 0
    for m in prog.memories:
        if m.kind not in ("weight", "exp", "bias"):
            continue
        if not 1 <= m.bits <= 62 or any(d <= 0 for d in m.shape):
            raise EpcError(f"{source}: .mem {m.name}: bad type or shape "
                           f"{m.type_str()} {list(m.shape)}")
        nb = (m.size * m.bits + 7) // 8
        if pos + nb > len(data):
            raise EpcError(f"{source}: memory data ends inside .mem {m.name}")
        m.data = unpack_words(data[pos:pos + nb], m.size, m.bits, m.signed).reshape(m.shape)
        pos += nb
    if pos != len(data):
        raise EpcError(f"{source}: {len(data) - pos} bytes of memory data left over")
    return prog
