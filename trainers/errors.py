"""One exception type for bad user input, with messages that name the field and the fix.

Messages point into the user's file: `search.activations[1].name: ...`, and an unknown key is answered with
the keys accepted at that place.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


REDACTED = "<redacted>"
# user:password@ (a password may hold unescaped slashes) or a bare token@ right after a URL's scheme.
_URL_USER_INFO = re.compile(r"(?<=://)(?:[^/@\s:]*:[^@\s]*|[^/@\s:]+)@")


def mask_url_credentials(text: str) -> str:
    """`text` with the user info of every URL in it (`scheme://user:password@host`) masked."""
    return _URL_USER_INFO.sub(f"{REDACTED}@", text)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def first_line(error: BaseException) -> str:
    """An error's first non-blank line (Ray's and MLflow's messages run to pages), else its type's name."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def one_of(value: str, accepted: Iterable[str], what: str) -> str:
    """`value` if it is one of `accepted`, else a ValueError (for pydantic validators) listing them."""
    choices = sorted(accepted)
    if value not in choices:
        raise ValueError(f"unknown {what}; accepted: {', '.join(choices)}")
    return value


def validated(model: type[ConfigT], values: Any, prefix: str = "") -> ConfigT:
    """`model` built from `values`, or a ConfigError with one `path: problem` line per bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        lines = [_describe(item, model, prefix) for item in error.errors()]
        raise ConfigError(f"invalid {model.__name__}:\n" + "\n".join(lines)) from None


def render_path(parts: Sequence[str | int]) -> str:
    """('search', 'activations', 1, 'name') -> 'search.activations[1].name'."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts if part != "")
    return text.removeprefix(".")


def _describe(item: dict[str, Any], model: type[BaseModel], prefix: str) -> str:
    loc = item["loc"]
    path = render_path((prefix, *loc))
    if item["type"] == "extra_forbidden":
        message = f"unknown key; accepted: {', '.join(_accepted_keys(model, loc)) or 'none'}"
    elif item["type"] == "value_error":
        message = str(item["ctx"]["error"])  # our own message, without pydantic's "Value error, " prefix
    else:
        message = item["msg"]
    value = item.get("input")
    if not isinstance(value, (dict, list)):  # whole mappings would drown the message
        message = f"{message} (got {mask_url_credentials(repr(value))})"
    return f"{path}: {message}" if path else message


def _accepted_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names of the model that holds the last key of `loc`, found by walking the annotations."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list position: the annotation walk already stepped into the item type
        field = current.model_fields.get(part) if current else None
        current = _nested_model(field.annotation) if field else None
    return sorted(current.model_fields) if current else []


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _nested_model(argument)
        if found:
            return found
    return None


class StudyInterrupted(RuntimeError):
    """The study stopped before every trial ended (Ctrl-C, SIGTERM, `ray job stop`): Tune saved its state, the
    MLflow parent run and its unfinished trials' runs are marked interrupted (KILLED), and `--resume` goes on."""

    def __init__(self, results_path: str) -> None:
        self.results_path = results_path
        super().__init__(f"interrupted: the study's state is saved in {results_path}; run the same command with "
                         "--resume to go on")
