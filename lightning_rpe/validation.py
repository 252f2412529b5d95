"""One vocabulary for checking options: every error names the owner, the parameter and what is accepted.

Pure Python (no torch, no Lightning), used by the callbacks, the measurement core, the control law
and the data/model modules. Each check returns the value in its canonical type (``int``, ``float``,
``bool``), so a caller can write ``self.tol = check_float(OWNER, "tol", tol, minimum=0.0, inclusive=False)``.

Every check raises :class:`ValueError` with a message of the form
``"<Owner>: <name> must be <what is accepted>; got <value>"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "fail"]


def fail(owner: str, name: str, accepted: str, value: Any) -> ValueError:
    """The standard error: ``"<owner>: <name> must be <accepted>; got <value!r>"``."""
    return ValueError(f"{owner}: {name} must be {accepted}; got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (not 0/1, not a string); else ValueError."""
    if not isinstance(value, bool):
        raise fail(owner, name, "True or False", value)
    return value


def check_choice(owner: str, name: str, value: Any, accepted: Sequence[Any]) -> Any:
    """``value`` when it is one of ``accepted`` (compared with ``==`` and type); else ValueError."""
    for option in accepted:
        if value is option or (type(value) is type(option) and value == option):
            return value
    raise fail(owner, name, "one of " + ", ".join(repr(a) for a in accepted), value)


@overload
def check_int(owner: str, name: str, value: Any, *, minimum: int | None = ..., allow_none: Literal[False] = ...) -> int: ...
@overload
def check_int(owner: str, name: str, value: Any, *, minimum: int | None = ..., allow_none: bool) -> int | None: ...
def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An ``int`` (``bool`` refused) ``>= minimum``; ``None`` passes only with ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        if minimum is None:
            what = "an int"
        elif minimum == 1 and allow_none:
            what = "a positive int"
        else:
            what = f"an int >= {minimum}"
        raise fail(owner, name, what + (" or None" if allow_none else ""), value)
    return int(value)


@overload
def check_float(
    owner: str, name: str, value: Any, *, minimum: float | None = ..., maximum: float | None = ...,
    inclusive: bool = ..., allow_none: Literal[False] = ..., allow_inf: bool = ...,
) -> float: ...
@overload
def check_float(
    owner: str, name: str, value: Any, *, minimum: float | None = ..., maximum: float | None = ...,
    inclusive: bool = ..., allow_none: bool, allow_inf: bool = ...,
) -> float | None: ...
def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive: bool = True,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """A finite real number (int or float, ``bool`` refused) in ``[minimum, maximum]``.

    With ``inclusive=False`` the bounds are strict (``minimum < value < maximum``); ``allow_inf``
    accepts ``+inf``; ``None`` passes only with ``allow_none``.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) or (allow_inf and v == math.inf)
        if ok and minimum is not None:
            ok = v >= minimum if inclusive else v > minimum
        if ok and maximum is not None:
            ok = v <= maximum if inclusive else v < maximum
    if not ok:
        lo = "" if minimum is None else (f" >= {minimum:g}" if inclusive else f" > {minimum:g}")
        hi = "" if maximum is None else (f" <= {maximum:g}" if inclusive else f" < {maximum:g}")
        joined = " and".join(p for p in (lo, hi) if p)
        what = ("a float" if allow_inf else "a finite float") + joined
        raise fail(owner, name, what + (" or None" if allow_none else ""), value)
    return float(value)
