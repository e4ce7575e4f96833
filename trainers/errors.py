"""One exception type for bad user input, with messages that name the field and the fix."""
from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """Render pydantic's errors as one line per field: `path.to.field: what is wrong`."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (remove it or check its spelling)"
        lines.append(f"{path or '<root>'}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def validated(config_type: type[ConfigT], values: dict, prefix: str = "") -> ConfigT:
    """Build a config, turning pydantic's ValidationError into a ConfigError naming each bad field."""
    try:
        return config_type.model_validate(values)
    except ValidationError as error:
        raise ConfigError(
            f"invalid {config_type.__name__}:\n{describe_validation_error(error, prefix)}"
        ) from None
