"""Quoting untrusted input in one-line error messages."""

from __future__ import annotations

__all__ = ["has_control", "show"]


def show(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that quote input.

    A huge integer is described by its size instead (its repr alone can cost seconds).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def has_control(text: str) -> bool:
    """Whether ``text`` holds a C0 control character or DEL."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
