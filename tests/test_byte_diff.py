"""The explanation of a failed comparison of long byte strings (tests/byte_diff.py)."""

from byte_diff import explain


def test_runs_of_differing_blocks_with_their_first_bytes():
    expected = bytes(range(256)) * 64  # 16 KiB
    got = bytearray(expected)
    got[4096 + 10 : 8192] = bytes(4096 - 10)  # block 1 reads as zeroes from byte 4106
    got[-1] ^= 1
    assert explain(bytes(got), expected) == [
        "16384 bytes == 16384 bytes",
        "2 of 4 4096-byte blocks they share differ:",
        "  blocks 1-1 (bytes 4096-8191), first at byte 4106: "
        "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 != 0a 0b 0c 0d 0e 0f 10 11 12 13 14 15 16 17 18 19",
        "  blocks 3-3 (bytes 12288-16383), first at byte 16383: fe != ff",
    ]


def test_lengths_and_a_short_last_block():
    assert explain(bytes(5000), memoryview(bytes(4100) + b"\1")) == [
        "5000 bytes == 4101 bytes",
        "the lengths differ by 899",
        "1 of 2 4096-byte blocks they share differ:",
        "  blocks 1-1 (bytes 4096-4100), first at byte 4100: 00 (the run is all zeroes) != 01",
    ]


def test_short_strings_and_other_types_keep_pytests_explanation():
    assert explain(b"abc", b"abd") is None
    assert explain("a" * 100, "b" * 100) is None
