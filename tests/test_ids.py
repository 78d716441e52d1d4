"""Raw id lookup: the id as given or its int <-> str twin, nothing looser."""

import numpy as np
import pytest

from twotower.ids import IdLookup, id_forms

INTS = IdLookup(np.array([40, 7, 12, -3]))  # positions 0..3
STRS = IdLookup(np.array(["alice", "12", "True", "bob"]))  # a "<U5" array: the width once truncated ids


@pytest.mark.parametrize(
    ("value", "position"),
    [
        (7, 1),
        (np.int64(12), 2),
        ("12", 2),  # typed on a command line
        ("-3", 3),
        (" 40 ", 0),  # surrounding blanks are not part of a number
        (12.0, 2),  # JSON 12.0 is the number 12
        ("007", -1),  # a string id of its own for the loaders, not 7
        ("+7", -1),
        ("7.0", -1),
        (3.5, -1),
        (True, -1),  # True == 1 in Python, but no user is called True here
        (np.bool_(True), -1),
        ("seven", -1),
        (None, -1),
    ],
)
def test_integer_catalogue(value, position):
    assert INTS.integer and INTS.position(value) == position


@pytest.mark.parametrize(
    ("value", "position"),
    [
        ("alice", 0),
        (np.str_("bob"), 3),
        (12, 1),  # an unquoted JSON number for a string catalogue
        (True, 2),  # only as the string "True"
        ("alice_2", -1),  # never truncated to the array's width
        ("ali", -1),
        (12.5, -1),
    ],
)
def test_string_catalogue(value, position):
    assert not STRS.integer and STRS.position(value) == position


def test_positions_keep_order_and_mark_each_unknown_on_its_own():
    assert INTS.positions(["nobody", "12", -1, 40]) == [-1, 2, -1, 0]
    assert len(INTS) == 4


def test_forms_by_hand():
    assert id_forms("12", integer_ids=True) == ["12", 12]
    assert id_forms("12", integer_ids=False) == ["12"]
    assert id_forms(12, integer_ids=False) == [12, "12"]
    assert id_forms(np.int64(12), integer_ids=True) == [12]
    assert id_forms(False, integer_ids=True) == ["False"]
    assert id_forms(2.5, integer_ids=True) == [2.5]
