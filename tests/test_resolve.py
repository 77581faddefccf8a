"""Name resolution refuses, with a pointer, what it cannot turn into an orca-diff diff folder."""

import pytest

from orca_diff.errors import UsageError
from orca_diff.hub.resolve import resolve_diff


def test_a_legacy_release_name_points_to_apply_and_convert():
    with pytest.raises(UsageError, match=r"legacy fastchat release.*orca-diff apply --diff vicuna-7b-v0.*convert"):
        resolve_diff("vicuna-7b-v0")
