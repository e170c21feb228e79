from obdconv.formats.crc import ZFILE_BLOCK_CRC_SEED, raw_crc32c


def test_spec_vectors() -> None:
    assert raw_crc32c(b"123456789") == 0x58E3FA20
    assert raw_crc32c(b"123456789", 100007) == 0x3C9BD4E0
    assert ZFILE_BLOCK_CRC_SEED == 100007


def test_incremental_matches_one_shot() -> None:
    # The raw CRC has no final inversion, so it chains: crc(a+b, s) == crc(b, crc(a, s)).
    a, b = b"hello ", b"overlaybd"
    assert raw_crc32c(b, raw_crc32c(a, 7)) == raw_crc32c(a + b, 7)


def test_accepts_buffers() -> None:
    data = bytearray(b"123456789")
    assert raw_crc32c(memoryview(data)) == raw_crc32c(bytes(data)) == 0x58E3FA20
