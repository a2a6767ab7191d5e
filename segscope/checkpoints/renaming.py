"""Renaming state-dict keys by an ordered list of regular-expression rules.

A rule is a pattern that must match a whole key and either an ``re`` replacement template
(``r"layers.\\1.norm"``) or a function of the match, for renames a template cannot express
(arithmetic on an index, say). The first matching rule wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Template = str | Callable[[re.Match[str]], str]
Rule = tuple[re.Pattern[str], Template]


def compile_rules(rules: list[tuple[str, Template]]) -> list[Rule]:
    """``(pattern, template)`` pairs with the patterns compiled."""
    return [(re.compile(pattern), template) for pattern, template in rules]


def rename_key(key: str, rules: list[Rule]) -> str | None:
    """``key`` renamed by the first rule whose pattern matches all of it; None if none does."""
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template(match) if callable(template) else match.expand(template)
    return None
