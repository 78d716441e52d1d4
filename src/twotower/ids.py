"""Raw ids to catalogue positions: the one lookup `twotower recommend` and the HTTP service share.

Ids arrive typed by people: every id on a command line is a string, and JSON may quote an integer
catalogue's ids or leave a string catalogue's unquoted. A lookup tries the id as given and its
int <-> str twin, and nothing looser. In particular it never truncates an id to the catalogue's
string width (``"alice_2"`` is not ``"alice"``), never rounds (``3.5`` is not user 3), and never
takes a bool for an integer (``True`` is not user 1, although ``True == 1`` in Python). A string
names an integer id only in its canonical decimal form: the loaders read ``"007"`` as a string
id, distinct from 7, so ``"007"`` is not user 7 either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["IdLookup", "id_forms"]


def id_forms(value: Any, integer_ids: bool) -> list[Any]:
    """The forms under which ``value`` may sit in a catalogue of integer (or other) ids."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):  # True == 1 and hashes like it: only a string catalogue may hold it
        return [str(value)]
    if isinstance(value, float) and not value.is_integer():
        return [value]  # never matches an integer id; a float catalogue would hold it as is
    forms = [value]
    if isinstance(value, str) and integer_ids:
        text = value.strip()
        # str(int(text)) == text keeps canonical forms only; int() refuses "--7" and > 4300 digits
        with contextlib.suppress(ValueError):
            if text.removeprefix("-").isdecimal() and str(int(text)) == text:
                forms.append(int(text))
    elif isinstance(value, int) and not integer_ids:
        forms.append(str(value))
    return forms


class IdLookup:
    """Position of each raw id of a catalogue (``ids``, in catalogue order); -1 for unknown ids.

    A plain dict: a hash lookup per id, where a pandas indexer call costs tens of microseconds (the
    service looks ids up on every request)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.integer = bool(np.issubdtype(ids.dtype, np.integer))
        self._positions: dict[Any, int] = {value: pos for pos, value in enumerate(ids.tolist())}

    def __len__(self) -> int:
        return len(self._positions)

    def position(self, value: Any) -> int:
        for candidate in id_forms(value, self.integer):
            pos = self._positions.get(candidate)
            if pos is not None:
                return pos
        return -1

    def positions(self, values: Iterable[Any]) -> list[int]:
        return [self.position(v) for v in values]
