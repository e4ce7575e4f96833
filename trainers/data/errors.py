"""Exceptions of the data path. Every message names the file, field or S3 object at fault and how to fix it."""
from __future__ import annotations

from trainers.errors import ConfigError


class DataError(Exception):
    """Base class: anything wrong with a data set, its manifest, or where it is stored."""


class SourceError(DataError):
    """A source data set (idx files, CIFAR pickles, an image tree) is missing, malformed or inconsistent."""


class ManifestError(DataError):
    """A .beton file does not match its sidecar manifest, or the manifest is missing or unreadable."""


class StagingError(DataError):
    """An S3 object could not be fetched, verified or uploaded."""


class LoaderConfigError(DataError, ConfigError):
    """A loader cannot be built with the requested settings on this process or machine."""
