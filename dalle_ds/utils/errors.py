"""Quoting another library's exception inside one of this project's one-line errors."""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``e``'s message, at most ``limit`` characters; the exception's type name when the
    message is empty (torch, DeepSpeed and transformers put several lines of advice after the first)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__
