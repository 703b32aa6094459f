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

_HEAD = struct.Struct("<6sHHII")


def pack_words(values: np.ndarray, bits: int) -> bytes:
    """Bit-pack integers (two's complement, `bits` wide, LSB first)."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    u = (v & ((1 << bits) - 1)).astype(np.uint64)
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_words(buf: bytes, n: int, bits: int, signed: bool) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[:n * bits]
    u = (planes.reshape(n, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)
    if signed:
        u = np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return u


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
        text = zlib.decompress(buf[_HEAD.size:_HEAD.size + tlen]).decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as e:
        raise EpcError(f"{source}: corrupt program skeleton ({e})")
    prog = assemble(text, source=f"{source}:skeleton")
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
