"""Name resolution refuses, with a pointer, what it cannot turn into an orca-diff diff folder."""

import pytest

from orca_diff.errors import UsageError
from orca_diff.hub.resolve import resolve_diff


def test_a_legacy_release_name_points_to_apply_and_convert():
    with pytest.raises(UsageError, match=r"legacy fastchat release.*orca-diff apply --diff vicuna-7b-v0.*convert"):
        resolve_diff("vicuna-7b-v0")


# --------------------------------------------------------------------------- pure helpers
from pathlib import Path  # noqa: E402

from orca_diff.errors import BaseMismatchError  # noqa: E402
from orca_diff.format import BaseFile  # noqa: E402
from orca_diff.hub.resolve import identify_cached_repo  # noqa: E402
from orca_diff.hub.transfer import RepoFileMeta, RepoRef, match_base_files  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("path, expected", [
    (f"/c/hub/models--meta-llama--Llama-2-13b-hf/snapshots/{SHA}", ("meta-llama/Llama-2-13b-hf", SHA)),
    # huggingface_hub refuses '--' in repo ids (it is the cache's separator): no repo is named so
    (f"/c/hub/models--org--name--with--dashes/snapshots/{SHA}/", None),
    (f"/c/hub/models--org--name-with-dashes/snapshots/{SHA}/", ("org/name-with-dashes", SHA)),
    (f"/c/hub/models--org--name/snapshots/main", None),          # not a commit sha
    (f"/c/hub/datasets--org--name/snapshots/{SHA}", None),        # not a model repo
    ("/home/me/llama-13b-hf", None),
])
def test_an_hf_cache_snapshot_folder_names_its_repo_and_commit(path, expected):
    assert identify_cached_repo(Path(path)) == expected


def _meta(**files: tuple[int, str | None]) -> dict[str, RepoFileMeta]:
    return {p.replace("__", "."): RepoFileMeta(p.replace("__", "."), size, sha) for p, (size, sha) in files.items()}


RECORDED = {"model-00001-of-00002.safetensors": BaseFile(10, "a" * 64),
            "model-00002-of-00002.safetensors": BaseFile(20, "b" * 64)}


def test_the_base_repo_holding_the_recorded_files_is_matched_even_under_other_names():
    repo = _meta(x__safetensors=(10, "a" * 64), y__safetensors=(20, "b" * 64), pytorch_model__bin=(30, "c" * 64))
    assert match_base_files(RepoRef("m/irror"), RECORDED, repo, "o/rig") == ["x.safetensors", "y.safetensors"]


def test_a_repo_with_other_weights_of_the_recorded_form_is_refused_naming_both():
    repo = _meta(model__safetensors=(10, "f" * 64))
    with pytest.raises(BaseMismatchError, match=r"o/ther is not the base.*nothing was downloaded.*o/rig"):
        match_base_files(RepoRef("o/ther"), RECORDED, repo, "o/rig")


def test_metadata_that_cannot_decide_defers_to_the_tensor_check():
    only_bin = _meta(pytorch_model__bin=(30, "c" * 64))
    assert match_base_files(RepoRef("o/ther"), RECORDED, only_bin, "o/rig") is None
    not_in_lfs = _meta(a__safetensors=(10, None), b__safetensors=(20, None))  # sha256 unknown
    assert match_base_files(RepoRef("o/ther"), RECORDED, not_in_lfs, "o/rig") is None
    assert match_base_files(RepoRef("o/ther"), {}, only_bin, "o/rig") is None  # an old diff records nothing
