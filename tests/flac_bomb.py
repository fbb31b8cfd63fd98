"""Silent FLAC files of any length, rate and channel count, made in milliseconds.

A FLAC frame of silence is a header, one CONSTANT subframe per channel (the value 0) and a CRC: about 35
bytes for up to 65,535 samples per channel. So a few hundred kilobytes can declare, and really hold,
ten minutes of 8-channel audio at 655,350 Hz (3.1 billion samples; libsndfile takes ~15 s of CPU to
decode it). Written by hand because encoding that much silence through libsndfile takes minutes.
Format: https://xiph.org/flac/format.html (STREAMINFO, FRAME_HEADER, SUBFRAME_CONSTANT, FRAME_FOOTER).
"""

from __future__ import annotations

BLOCK = 32768  # samples per channel per frame; block size code 0b1111
BITS = 16


def _table(poly: int, width: int) -> list[int]:
    top, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


_CRC8, _CRC16 = _table(0x07, 8), _table(0x8005, 16)


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def _frame(number: int, samples: int, channels: int) -> bytes:
    if samples == BLOCK:
        size_code, extra = 0b1111, b""
    else:  # the last, shorter frame: block size - 1 in 16 bits after the frame number
        size_code, extra = 0b0111, (samples - 1).to_bytes(2, "big")
    header = bytes([0xFF, 0xF8, size_code << 4,  # sample rate code 0: from STREAMINFO
                    ((channels - 1) << 4) | (0b100 << 1)])  # independent channels, 16 bits per sample
    header += chr(number).encode("utf-8") + extra  # the frame number, UTF-8 coded
    header += bytes([_crc8(header)])
    body = header + b"\x00\x00\x00" * channels  # SUBFRAME_CONSTANT: type 0, the value 0 in 16 bits
    return body + _crc16(body).to_bytes(2, "big")


def silent_flac(seconds: float, rate: int, channels: int, *, declare_length: bool = True) -> bytes:
    """``seconds`` of silence at ``rate`` Hz on ``channels`` channels; ``declare_length=False`` writes 0
    ("unknown") as the total in STREAMINFO, as a streaming encoder does."""
    total = int(seconds * rate)
    info = (BLOCK.to_bytes(2, "big") * 2 + b"\x00" * 6
            + ((rate << 44) | ((channels - 1) << 41) | ((BITS - 1) << 36) | (total if declare_length else 0)
               ).to_bytes(8, "big")
            + b"\x00" * 16)  # MD5 unknown
    out = [b"fLaC", bytes([0x80, 0, 0, len(info)]), info]  # last metadata block, type 0 (STREAMINFO)
    whole, rest = divmod(total, BLOCK)
    for number in range(whole):
        out.append(_frame(number, BLOCK, channels))
    if rest:
        out.append(_frame(whole, rest, channels))
    return b"".join(out)
