"""Type and range checks for values that enter from the caller: one clear InputError naming the field."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import InputError


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            hint: str = "", error: type[Exception] = InputError) -> int:
    """An int (numpy ints too; bool and float refused) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {type(value).__name__} {value!r}{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{name} must be {_range(minimum, maximum)}, got {value}{hint}")
    return value


def real(name: str, value: Any, *, above: float | None = None, minimum: float | None = None,
         maximum: float | None = None, hint: str = "") -> float:
    """A finite int or float (bool refused): > above, >= minimum, <= maximum where given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}{hint}")
    if above is not None and value <= above:
        raise InputError(f"{name} must be > {above:g}, got {value:g}{hint}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be {_range(minimum, maximum)}, got {value:g}{hint}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _range(minimum, maximum) -> str:
    if maximum is None:
        return f">= {minimum:g}"
    if minimum is None:
        return f"<= {maximum:g}"
    return f"in [{minimum:g}, {maximum:g}]"
