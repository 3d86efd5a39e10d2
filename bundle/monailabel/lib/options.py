"""Parsing of ``--conf`` values and request options.

MONAI Label passes every ``--conf`` value as a string, and viewers send a task's config table back
as they show it (numbers as strings, an untouched choice as the whole list), so values are
parsed here with errors that name the option.
"""

from __future__ import annotations

import json
from typing import Any

from medad.io.transforms import window_range

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, value: Any) -> bool:
    """A flag: a bool, or true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} expects true or false, got {value!r}")


def parse_window(value: str | None) -> str | list[float] | None:
    """A CT window: a preset name (``brain``, ``lung``, ...) or ``[center, width]`` in HU."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    text = str(value).strip()
    window = json.loads(text) if text.startswith("[") else text
    window_range(window)  # an unknown preset fails at start-up, not on the first request
    return window


def numeric_option(name: str, value: Any) -> float | None:
    """A number or a numeric string; ``None`` for ``"auto"``, empty or missing."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 'auto', got {value!r}") from None


def int_option(name: str, value: Any, minimum: int) -> int:
    """An integer of at least ``minimum``."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {number}")
    return number


def choice_option(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``; a list (a viewer's untouched combo box) stands for its first entry."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)
