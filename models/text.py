"""Text from users: what a field may hold, and how it is shown so that it cannot act on a terminal.

PostgreSQL cannot store NUL in text, and UTF-8 cannot encode a lone surrogate; a terminal acts on
control characters (ESC starts a sequence that can clear the screen or move the cursor, CR goes
back over what was printed). So a text field refuses those at validation, in every door, naming
the character and where it is; and whatever the CLI, `top` or a log prints from a user goes
through `inert`, which escapes what is left (newlines and tabs in a prompt, bidi overrides).
"""

from __future__ import annotations

import re

# Refused in text fields: C0 controls but tab and newline, DEL, C1 controls, lone surrogates.
_REFUSED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# Escaped when shown: every control character, line and paragraph separators, and the bidi
# controls that reorder what follows them (a prompt must not make a line read backwards).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def refused_character(text: str, *, allow_newlines: bool = True) -> str | None:
    """The problem with the first character a text field may not hold ("NUL (U+0000) at
    character 4"), or None. Without `allow_newlines`, tab and newline are refused too (names,
    keys, URLs: one line)."""
    match = _REFUSED.search(text) if allow_newlines else _UNSAFE.search(text)
    if match is None:
        return None
    return f"{describe_character(match[0])} at character {match.start() + 1}"


def check_text(text: str, *, allow_newlines: bool = True) -> str:
    """`text`, or ValueError naming the first character it may not hold (a pydantic validator)."""
    problem = refused_character(text, allow_newlines=allow_newlines)
    if problem is not None:
        raise ValueError(f"must not hold control characters: {problem}")
    return text


def describe_character(ch: str) -> str:
    names = {"\x00": "NUL", "\t": "tab", "\n": "newline", "\r": "carriage return", "\x1b": "escape",
             "\x7f": "delete"}
    code = f"U+{ord(ch):04X}"
    return f"{names[ch]} ({code})" if ch in names else f"control character {code}"


def inert(text: str) -> str:
    """`text` as a terminal may print it: every control, separator and bidi character escaped
    as Python writes it (\\x1b, \\n, \\u202e), all else as it is."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    if match[0] in "\t\n\r":
        return {"\t": "\\t", "\n": "\\n", "\r": "\\r"}[match[0]]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def state_counts(counts: dict[str, int], separator: str = ", ") -> str:
    """Jobs by state as a user reads them ("0 queued, 2 running, ..."): follow-ups waiting for
    their parent only where there are any."""
    return separator.join(f"{n} {state}" for state, n in counts.items() if state != "waiting" or n)
