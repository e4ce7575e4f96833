"""The value-or-distribution syntax of study files, and its translation to Ray Tune and Optuna.

In a study file a plain value is fixed. A mapping with exactly one key names a distribution:

    {choice: [a, b, c]}        one of the options, sampled uniformly
    {grid: [a, b, c]}          every option (Tune grid search: multiplies the number of trials)
    {uniform: [lo, hi]}        a float in [lo, hi]
    {loguniform: [lo, hi]}     a float in [lo, hi], uniform in log space (0 < lo)
    {randint: [lo, hi]}        an integer from lo to hi, both included
    {quniform: [lo, hi, q]}    a float in [lo, hi] rounded to a multiple of q
    {value: X}                 X itself: how to write a fixed value that is a mapping (e.g. smooth_params)

Bounds may be fractions written as strings ("4/255"), like the attack settings accept.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from ray import tune

# Option types Optuna's suggest_categorical accepts.
_OPTUNA_CATEGORICAL_TYPES = (type(None), bool, int, float, str)
# Where inside a continuous range the load-time check draws its inner value: off the middle, so a range of
# whole numbers ([2, 6]) still yields a fractional draw, as the samplers do.
_INNER_FRACTION = 0.381966


class Distribution:
    """A searched (or fixed) value. Subclasses are frozen dataclasses registered in DISTRIBUTIONS."""

    keyword: ClassVar[str]
    # How many values Tune enumerates for it (only grids enumerate; samples are drawn per trial).
    grid_size: ClassVar[int] = 1

    def to_tune(self) -> Any:
        """The value or Tune search-space object for `Tuner(param_space=...)`."""
        raise NotImplementedError

    def candidates(self) -> tuple[Any, ...]:
        """Values that stand for everything it can draw, of the type its samplers return (every option; a
        range's ends and a value inside): what the load-time checks try in trial configs."""
        raise NotImplementedError

    @property
    def draws_floats(self) -> bool:
        """Whether it draws floats whatever its bounds are written as (uniform, loguniform, quniform)."""
        return False

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw the value from an Optuna trial (define-by-run)."""
        raise NotImplementedError

    def to_spec(self) -> Any:
        """Back to study-file syntax."""
        raise NotImplementedError

    @property
    def is_fixed(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.keyword}{self.to_spec()[self.keyword]}"


@dataclass(frozen=True)
class Fixed(Distribution):
    value: Any
    keyword: ClassVar[str] = "value"

    @classmethod
    def from_args(cls, args: Any) -> Fixed:
        return cls(args)

    def to_tune(self) -> Any:
        return self.value

    def candidates(self) -> tuple[Any, ...]:
        return (self.value,)

    def suggest(self, trial: Any, name: str) -> Any:
        return self.value  # nothing to ask Optuna

    def to_spec(self) -> Any:
        return {self.keyword: self.value} if isinstance(self.value, Mapping) else self.value

    @property
    def is_fixed(self) -> bool:
        return True

    def __str__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class Choice(Distribution):
    options: tuple[Any, ...]
    keyword: ClassVar[str] = "choice"

    @classmethod
    def from_args(cls, args: Any) -> Choice:
        if isinstance(args, (str, bytes, Mapping)) or not isinstance(args, Sequence) or not args:
            raise ValueError(f"{cls.keyword} takes a non-empty list of options, e.g. {{{cls.keyword}: [1, 2]}}; "
                             f"got {args!r}")
        return cls(tuple(args))

    def to_tune(self) -> Any:
        return tune.choice(list(self.options))

    def candidates(self) -> tuple[Any, ...]:
        return self.options

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.options))

    def to_spec(self) -> Any:
        return {self.keyword: list(self.options)}

    def optuna_problem(self) -> str | None:
        if all(isinstance(option, _OPTUNA_CATEGORICAL_TYPES) for option in self.options):
            return None
        return "Optuna's categorical options must be numbers, strings, booleans or null"


@dataclass(frozen=True)
class Grid(Choice):
    keyword: ClassVar[str] = "grid"

    @property
    def grid_size(self) -> int:  # type: ignore[override]
        return len(self.options)

    def to_tune(self) -> Any:
        return tune.grid_search(list(self.options))

    def suggest(self, trial: Any, name: str) -> Any:
        raise TypeError("grid search is not available with Optuna")  # rejected when the study loads

    def optuna_problem(self) -> str | None:
        return "Optuna cannot enumerate a grid; use {choice: [...]} instead"


@dataclass(frozen=True)
class Uniform(Distribution):
    lo: float
    hi: float
    keyword: ClassVar[str] = "uniform"

    @classmethod
    def from_args(cls, args: Any) -> Uniform:
        lo, hi = _bounds(cls.keyword, args, ("lo", "hi"))
        _require_increasing(cls.keyword, lo, hi)
        return cls(lo, hi)

    def to_tune(self) -> Any:
        return tune.uniform(self.lo, self.hi)

    def candidates(self) -> tuple[Any, ...]:
        return (float(self.lo), self._inner(), float(self.hi))

    def _inner(self) -> float:
        return self.lo + (self.hi - self.lo) * _INNER_FRACTION

    @property
    def draws_floats(self) -> bool:
        return True

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_float(name, self.lo, self.hi)

    def to_spec(self) -> Any:
        return {self.keyword: [self.lo, self.hi]}


@dataclass(frozen=True)
class LogUniform(Uniform):
    keyword: ClassVar[str] = "loguniform"

    @classmethod
    def from_args(cls, args: Any) -> LogUniform:
        distribution = super().from_args(args)
        if distribution.lo <= 0:
            raise ValueError(f"loguniform needs 0 < lo; got lo={distribution.lo}")
        return distribution

    def to_tune(self) -> Any:
        return tune.loguniform(self.lo, self.hi)

    def _inner(self) -> float:
        return self.lo * (self.hi / self.lo) ** _INNER_FRACTION

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_float(name, self.lo, self.hi, log=True)


@dataclass(frozen=True)
class QUniform(Distribution):
    lo: float
    hi: float
    q: float
    keyword: ClassVar[str] = "quniform"

    @classmethod
    def from_args(cls, args: Any) -> QUniform:
        lo, hi, q = _bounds(cls.keyword, args, ("lo", "hi", "q"))
        _require_increasing(cls.keyword, lo, hi)
        if not 0 < q <= hi - lo:
            raise ValueError(f"quniform needs 0 < q <= hi - lo; got q={q} for [{lo}, {hi}]")
        return cls(lo, hi, q)

    def to_tune(self) -> Any:
        return tune.quniform(self.lo, self.hi, self.q)

    def candidates(self) -> tuple[Any, ...]:
        # Tune rounds each draw to a multiple of q (as a float): the ends and an inner value, rounded alike.
        inner = self.lo + (self.hi - self.lo) * _INNER_FRACTION
        return tuple(dict.fromkeys(float(round(value / self.q) * self.q) for value in (self.lo, inner, self.hi)))

    @property
    def draws_floats(self) -> bool:
        return True

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_float(name, self.lo, self.hi, step=self.q)

    def to_spec(self) -> Any:
        return {self.keyword: [self.lo, self.hi, self.q]}


@dataclass(frozen=True)
class RandInt(Distribution):
    lo: int
    hi: int  # included (Tune's randint excludes it: to_tune adds one)
    keyword: ClassVar[str] = "randint"

    @classmethod
    def from_args(cls, args: Any) -> RandInt:
        lo, hi = _bounds(cls.keyword, args, ("lo", "hi"))
        if lo != int(lo) or hi != int(hi):
            raise ValueError(f"randint bounds must be integers; got [{lo}, {hi}]")
        _require_increasing(cls.keyword, lo, hi)
        return cls(int(lo), int(hi))

    def to_tune(self) -> Any:
        return tune.randint(self.lo, self.hi + 1)

    def candidates(self) -> tuple[Any, ...]:
        return (self.lo, self.hi)

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_int(name, self.lo, self.hi)

    def to_spec(self) -> Any:
        return {self.keyword: [self.lo, self.hi]}


# The syntax table: study-file keyword -> constructor from its arguments.
DISTRIBUTIONS: dict[str, Callable[[Any], Distribution]] = {
    kind.keyword: kind.from_args for kind in (Fixed, Choice, Grid, Uniform, LogUniform, QUniform, RandInt)
}


def parse_distribution(raw: Any) -> Distribution:
    """A study-file value: a plain value is Fixed; a one-key mapping names a distribution (ValueError if bad)."""
    if isinstance(raw, Distribution):
        return raw
    if not isinstance(raw, Mapping):
        return Fixed(raw)
    if len(raw) != 1:
        raise ValueError(f"a distribution is a mapping with one key, one of {sorted(DISTRIBUTIONS)}; got keys "
                         f"{sorted(map(str, raw))} (write a fixed mapping as {{value: {{...}}}})")
    ((keyword, args),) = raw.items()
    if keyword not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {keyword!r}; accepted: {', '.join(sorted(DISTRIBUTIONS))} "
                         "(write a fixed mapping as {value: {...}})")
    return DISTRIBUTIONS[keyword](args)


def _bounds(keyword: str, args: Any, names: tuple[str, ...]) -> list[float]:
    example = ", ".join(names)
    if isinstance(args, (str, bytes, Mapping)) or not isinstance(args, Sequence) or len(args) != len(names):
        raise ValueError(f"{keyword} takes [{example}]; got {args!r}")
    return [_number(keyword, value) for value in args]


def _number(keyword: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{keyword} bounds must be finite numbers or fractions like '4/255'; got {value!r}")
    return value


def _require_increasing(keyword: str, lo: float, hi: float) -> None:
    if not lo < hi:
        raise ValueError(f"{keyword} needs lo < hi; got lo={lo}, hi={hi}")
