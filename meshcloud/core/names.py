"""Name validation, in one place.

Every name that can reach libvirt XML, a file path, a command line or a URL
(racks, sites, appliances, disks, images, users) passes through
:func:`validate_name` first. The rule is deliberately narrow, like a DNS
label: lowercase ASCII letters, digits and single hyphens, starting with a
letter, at most 63 characters. Quotes, ``<``, ``&``, ``/``, ``..``, control
characters, whitespace and non-ASCII look-alikes are all refused.
"""

import re
import unicodedata

from meshcloud.core.errors import InvalidInput

NAME_MAX_LEN = 63
_NAME_RE = re.compile(r"^[a-z](?:[a-z0-9]|-(?=[a-z0-9]))*$")


def _describe_char(ch: str) -> str:
    if ch.isprintable() and ch.isascii():
        return repr(ch)
    name = unicodedata.name(ch, "")
    code = f"U+{ord(ch):04X}"
    return f"{code} {name}".strip() if name else code


def name_problem(value: object) -> str | None:
    """Return why ``value`` is not a valid name, or None if it is valid."""
    # Fast path for the common case (every model construction validates its names):
    # fullmatch, unlike match with "$", cannot accept a trailing newline.
    if type(value) is str and len(value) <= NAME_MAX_LEN and _NAME_RE.fullmatch(value):
        return None
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if value == "":
        return "must not be empty"
    if len(value) > NAME_MAX_LEN:
        return f"is {len(value)} characters long; the limit is {NAME_MAX_LEN}"
    for pos, ch in enumerate(value):
        if not ch.isascii():
            return (
                f"contains the non-ASCII character {_describe_char(ch)} at position {pos}"
                " (look-alike letters are refused)"
            )
        if not (ch.islower() or ch.isdigit() or ch == "-"):
            return f"contains the character {_describe_char(ch)} at position {pos}"
    if not value[0].isalpha():
        return "must start with a lowercase letter"
    if value.endswith("-"):
        return "must not end with '-'"
    if "--" in value:
        return "must not contain '--'"
    if not _NAME_RE.match(value):  # defensive: the checks above should cover everything
        return "is not a valid name"
    return None


def validate_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid name, else raise InvalidInput naming ``kind``."""
    if type(value) is str and len(value) <= NAME_MAX_LEN and _NAME_RE.fullmatch(value):
        return value  # the fast path of name_problem, without the extra call
    problem = name_problem(value)
    if problem is not None:
        shown = repr(value) if not isinstance(value, str) else repr(value[:80])
        raise InvalidInput(
            f"{kind} name {shown} {problem}: use 1-{NAME_MAX_LEN} lowercase letters,"
            " digits and single '-', starting with a letter"
        )
    assert isinstance(value, str)
    return value


def is_valid_name(value: object) -> bool:
    """True when ``value`` passes :func:`validate_name`."""
    return name_problem(value) is None
