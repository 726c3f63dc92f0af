"""Number checks shared by the inference modules: a value outside its limits is refused, never clamped, and the
message names the argument and the value as given."""
from __future__ import annotations

from core.errors import BadInputError

_SHOWN_DIGITS = 20  # a pasted 400-digit number is named by its start, not printed whole


def shown(value: object) -> str:
    """A number as a message shows it: whole numbers exactly (cut when huge), others in `:g` form."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return repr(value)[:40]
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= _SHOWN_DIGITS else f"{text[:_SHOWN_DIGITS]}… ({len(text)} digits)"
    return f"{value:g}"


def check_number(name: str, value: object, low: float, high: float, whole: bool = False, unit: str = "") -> None:
    """Refuse `value` unless it is a number (a whole one with `whole`) from `low` to `high`; NaN and infinities too."""
    is_number = isinstance(value, int) if whole else isinstance(value, int | float)
    if isinstance(value, bool) or not is_number:
        raise BadInputError(f"`{name}` has to be a {'whole ' if whole else ''}number but is {shown(value)}.")
    if not (low <= value <= high):  # false for NaN; Python compares any int with a float exactly
        raise BadInputError(f"`{name}` has to be between {shown(low)} and {shown(high)}{unit} but is {shown(value)}.")
