"""hv.textsafe.printable: text from a peer or a file cannot act on a terminal or forge lines."""
from __future__ import annotations

import pytest

from hv.textsafe import printable, printable_bytes


@pytest.mark.parametrize("raw,shown", [
    ("line\nhv: forged", "line\\nhv: forged"),
    ("a\rb\tc", "a\\rb\\tc"),
    ("\x1b[2J", "\\x1b[2J"),            # ESC: a terminal control sequence
    ("del\x7f", "del\\x7f"),
    ("c1\x85\x9b31m", "c1\\x85\\x9b31m"),  # NEL and CSI from the C1 range
    ("\x00", "\\x00"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),  # Unicode line/paragraph separators
    ("rtl\u202e", "rtl\\u202e"),          # a bidi override (format character)
    ("tag\U000e0001", "tag\\U000e0001"),
    ("nbsp\u00a0", "nbsp\\xa0"),
])
def test_non_printable_characters_are_escaped(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()


def test_printable_text_is_unchanged() -> None:
    for text in ("", "virtio-blk-pci rootfs", "memory size mismatch: source 256 MiB", "café 日本 ü",
                 "C:\\path\\x1b (a literal backslash)", "'quoted' \"both\""):
        assert printable(text) == text


def test_idempotent() -> None:
    """Escaping where text is received and again where it is printed changes nothing more."""
    raw = "x\n\x1b[2J\u2028\x9b\\n"
    once = printable(raw)
    assert printable(once) == once


def test_bytes_decode_with_replacement_then_escape() -> None:
    assert printable_bytes(b"ok\xff\n\x1b") == "ok\ufffd\\n\\x1b"
