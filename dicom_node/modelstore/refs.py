"""Model references: the one grammar for ``<model>@<alias>`` and ``<model>:<version>``.

Rules (``model: thyroid-seg@production``), the model-store CLI (``models show thyroid-seg:2``),
serving and the job store all name a model version this way, and all parse it here::

    ref     := name [ "@" alias | ":" version ]
    name    := [A-Za-z0-9][A-Za-z0-9._-]{0,63}        (a model folder of the store)
    alias   := [a-z][a-z0-9_-]{0,31}                   (an alias in aliases.yaml)
    version := [A-Za-z0-9][A-Za-z0-9._-]{0,63}        (a version folder; never an alias)

A bare ``name`` means ``name@production`` where the caller allows it (the CLI and the store do);
rules must say which alias or version they want (``default_alias=None``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

LOGGER = logging.getLogger(__name__)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""A model name (also the model's folder in the store)."""

ALIAS_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
"""An alias name: lower-case, starting with a letter (``production``, ``canary``, ``shadow``)."""

VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""A version (also its folder in the store), e.g. ``1`` or ``2.1``."""

DEFAULT_ALIAS = "production"
"""What a bare model name means where a bare name is allowed."""

_REF_RE = re.compile(
    rf"^(?P<name>{NAME_PATTERN})(?:@(?P<alias>{ALIAS_PATTERN})|:(?P<version>{VERSION_PATTERN}))?$"
)


class ModelRefError(ValueError):
    """A model reference does not follow the grammar; the message shows the forms and the value."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of ``alias`` and ``version`` is set.

    ``str()`` gives the canonical text (``thyroid-seg@production``, ``thyroid-seg:2``).
    """

    name: str
    alias: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        if (self.alias is None) == (self.version is None):
            raise ModelRefError(
                f"model reference needs exactly one of alias and version, got "
                f"alias={self.alias!r} version={self.version!r}"
            )

    def __str__(self) -> str:
        return (
            f"{self.name}@{self.alias}" if self.alias is not None else f"{self.name}:{self.version}"
        )

    def as_tuple(self) -> tuple[str, str | None, str | None]:
        """Return ``(name, alias, version)``."""
        return self.name, self.alias, self.version


def parse_model_ref(ref: str, *, default_alias: str | None = DEFAULT_ALIAS) -> ModelRef:
    """Parse ``name@alias`` / ``name:version`` (/ ``name`` when ``default_alias`` is set).

    Parameters
    ----------
    ref:
        The reference text; surrounding blanks are ignored.
    default_alias:
        The alias a bare ``name`` means; ``None`` refuses a bare name (rules do).

    Returns
    -------
    ModelRef

    Raises
    ------
    ModelRefError
        ``ref`` is not a string or does not follow the grammar (module docstring); the message
        shows the expected forms and the bad value.
    """
    match = _REF_RE.match(ref.strip()) if isinstance(ref, str) else None
    if match is not None and match.group("alias") is None and match.group("version") is None:
        if default_alias is None:
            match = None
    if match is None:
        bare = " (or '<model>' for <model>@production)" if default_alias is not None else ""
        raise ModelRefError(
            f"model must be '<model>@<alias>' or '<model>:<version>'{bare} "
            f"(e.g. thyroid-seg@production; alias: lower-case letters, digits, '_' or '-'), "
            f"got {ref!r}"
        )
    name, alias, version = match.group("name", "alias", "version")
    if alias is None and version is None:
        alias = default_alias
    return ModelRef(name=name, alias=alias, version=version)
