"""User-facing errors: each carries one clear message and is shown without a traceback by the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvlensError(Exception):
    """Base of every error convlens reports to a user as a single message."""


class UnknownComponentError(ConvlensError, LookupError):
    """A plugin name, kind or layer that does not exist."""


class AmbiguousComponentError(ConvlensError, LookupError):
    """A bare name that several distributions register."""


class ParameterError(ConvlensError, ValueError):
    """A parameter that is unknown, of the wrong type or out of range."""


class PluginLoadError(ConvlensError):
    """A plugin failed to import or register while strict loading is on."""


class ContractError(ConvlensError):
    """A component returned something that breaks the contract of its kind."""


def suggest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest candidates to ``word`` (case-insensitive), best first."""
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[m] for m in matches]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """'; did you mean 'x'?' or an empty string when nothing is close."""
    close = suggest(word, candidates)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
