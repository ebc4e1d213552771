"""Showing text that came from a peer or a file without letting it act on a terminal.

A migration stream, a snapshot file or a QMP client can put any characters into a
message hv later prints (an ERROR section's reason, a device id in a CONFIG
fingerprint). Printed as received, a newline forges a second ``hv: ...`` line and an ESC
starts a terminal control sequence. :func:`printable` is the one place that turns such
text into something safe to show: every character Python does not consider printable
(``str.isprintable``: C0 controls incl. ``\\n``/``\\r``/``\\t``, ESC, DEL, the C1 range,
U+2028/U+2029 line and paragraph separators, other format/unassigned characters) becomes
a ``repr``-style escape (``\\n``, ``\\x1b``, ``\\u2028``, ``\\U000e0001``).

Backslashes are left as they are, so the function is idempotent (escaping escaped text
changes nothing) and text may be escaped where it is received and again where it is
printed without growing ``\\`` sequences. A literal ``\\x1b`` in the input therefore
looks like an escaped ESC in the output; it is as harmless as one.
"""
from __future__ import annotations

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character replaced by its escape (see module doc)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def printable_bytes(data: bytes) -> str:
    """Untrusted bytes meant to be UTF-8 text, decoded (invalid bytes as U+FFFD) and escaped."""
    return printable(data.decode("utf-8", errors="replace"))
