"""Reading ini files with environment and command-line overrides, validated with clear errors.

Precedence, highest first: explicit overrides (command-line flags) → environment variable →
ini value → default. Every error names the file and the key, so a user knows what to fix.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from MessageBroker.errors import BrokerConfigError

_MISSING = object()


class IniSettings:
    """One ini file, read once; values looked up by (section, key). Not thread-safe to mutate."""

    def __init__(
        self,
        path: Path,
        *,
        overrides: Mapping[tuple[str, str], str] | None = None,
        error: type[Exception] = BrokerConfigError,
    ):
        self.path = Path(path)
        self._error = error
        self._overrides = dict(overrides or {})
        # Keys are case-sensitive: librdkafka settings are passed through verbatim.
        self._parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        self._parser.optionxform = str  # type: ignore[assignment, method-assign]
        if not self.path.is_file():
            raise error("config file not found", file=str(self.path))
        try:
            self._parser.read(self.path, encoding="utf-8")
        except configparser.Error as exc:
            raise error(f"cannot parse config: {exc}", file=str(self.path)) from exc

    def get(self, section: str, key: str, *, env: str | None = None, default: object = _MISSING) -> str:
        """The value for ``[section] key``; raises the config error naming file and key if absent."""
        if (section, key) in self._overrides:
            return self._overrides[(section, key)]
        if env and os.environ.get(env, "").strip():
            return os.environ[env].strip()
        if self._parser.has_option(section, key) and self._parser.get(section, key).strip():
            return self._parser.get(section, key).strip()
        if default is not _MISSING:
            return default  # type: ignore[return-value]
        hint = f" (or set {env})" if env else ""
        raise self._error(f"missing setting{hint}", file=str(self.path), key=f"{section}.{key}")

    def get_int(self, section: str, key: str, *, env: str | None = None, default: object = _MISSING,
                minimum: int | None = None, maximum: int | None = None) -> int:
        """``get`` as a whole number within [minimum, maximum]; errors name file and key."""
        return self._number(int, "a whole number", section, key, env, default, minimum, maximum)

    def get_float(self, section: str, key: str, *, env: str | None = None, default: object = _MISSING,
                  minimum: float | None = None, maximum: float | None = None) -> float:
        """``get`` as a number within [minimum, maximum]; errors name file and key."""
        return self._number(float, "a number", section, key, env, default, minimum, maximum)

    def _number(self, kind: type, described: str, section: str, key: str, env: str | None, default: object,
                minimum: float | None, maximum: float | None) -> Any:
        raw = self.get(section, key, env=env, default=default)
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise self._error(f"expected {described}, got {raw!r}", file=str(self.path),
                              key=f"{section}.{key}") from None
        if minimum is not None and value < minimum:
            raise self._error(f"must be at least {minimum}, got {value}", file=str(self.path),
                              key=f"{section}.{key}")
        if maximum is not None and value > maximum:
            raise self._error(f"must be at most {maximum}, got {value}", file=str(self.path),
                              key=f"{section}.{key}")
        return value

    def section(self, section: str) -> dict[str, str]:
        """All keys of a section (empty if absent), with overrides for that section applied."""
        values = dict(self._parser.items(section)) if self._parser.has_section(section) else {}
        values.update({k: v for (s, k), v in self._overrides.items() if s == section})
        return {k: v.strip() for k, v in values.items() if v.strip()}
