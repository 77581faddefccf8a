"""The model card (README.md) of a diff: Hub metadata, and a body that says loudly it is not a model.

Diffs served as if they were models are a known failure (FastChat#890, helm#1804), so the card
sets ``inference: false``, tags the repo ``orca-diff``/``weight-diff``, names the base in
``base_model`` (the Hub has no "diff" relation, so none is claimed) and tells the reader the one
command that rebuilds the model and the one that checks it. ``make`` writes the card into every
diff; ``push`` renders it again with the repo id so the commands can be pasted as they are.
"""

from __future__ import annotations

import hashlib
import json

from ..format import Manifest

LIBRARY_NAME = "orca-diff"
TAGS = ("orca-diff", "weight-diff")
def source_url() -> str | None:
    """Where the installed orca-diff's source lives, for the card's install line (it is not on
    PyPI yet): the ``Source`` project URL of the installed package's metadata, when its build
    declared one. Never a guess: without it the card says to install from a clone."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        urls = metadata("orca-diff").get_all("Project-URL") or []
    except (ImportError, PackageNotFoundError):
        return None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("source", "repository", "homepage") and url.strip().startswith("https://"):
            return url.strip()
    return None


def _install_lines() -> tuple[str, str]:
    """(the card's install command, the sentence after the code block)."""
    url = source_url()
    if url is None:
        return ("pip install ./orca-diff   # orca-diff is not on PyPI yet: a clone of its source repository",
                "(Or a wheel built once from that clone: `pip wheel ./orca-diff`, then `pip install "
                "orca_diff-*.whl`. Once released on PyPI: `pip install orca-diff`.)")
    return (f'pip install "orca-diff @ git+{url}"   # orca-diff is not on PyPI yet: from its source repository',
            f'(A wheel works too: `pip wheel "orca-diff @ git+{url}"` once, then `pip install orca_diff-*.whl` '
            "on machines without git. Once released on PyPI: `pip install orca-diff`.)")
#: Closes every generated card, with a hash of the text above it (so edits can be detected).
CARD_MARK = "<!-- orca-diff generated card "


def _yaml_str(s: str) -> str:
    """A YAML scalar for any string: JSON strings are valid YAML (no PyYAML needed to write)."""
    return json.dumps(s, ensure_ascii=False)


def _base_catalog_entry(manifest: Manifest):
    if not manifest.base.name:
        return None
    try:
        from .catalog import lookup

        return lookup(manifest.base.name, "base")
    except Exception:  # a broken user catalog must not stop make from writing its card
        return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _reader_note(manifest: Manifest) -> str:
    """What a format version needs of the reader (version 4: the low-rank frames of orca-diff 0.4)."""
    return " (needs orca-diff 0.4 or newer)" if manifest.format_version >= 4 else ""


def render_card(manifest: Manifest, *, repo_id: str | None = None, license: str | None = None) -> str:
    """README.md text for a diff. ``repo_id``: where it is (being) published, used in the commands;
    ``license``: the card's license (default: the catalog's license of the base, else "other")."""
    entry = _base_catalog_entry(manifest)
    base_repo = manifest.base.repo
    if base_repo is None and entry is not None and entry.fingerprint and manifest.base.fingerprint and (
            entry.fingerprint.startswith(manifest.base.fingerprint) or manifest.base.fingerprint.startswith(entry.fingerprint)):
        base_repo = entry.repo  # a name alone is not proof: only a matching fingerprint is
    base_rev = manifest.base.revision
    license = license or (entry.license if entry and entry.license else "other")
    base_label = manifest.base.name or base_repo or "its base model"

    front = ["---"]
    if base_repo:
        front.append(f"base_model: {_yaml_str(base_repo)}")
    front.append(f"license: {_yaml_str(license)}")
    if license == "other":
        front.append(f"license_name: {_yaml_str('same-as-base-model')}")
    front.append(f"library_name: {LIBRARY_NAME}")
    front.append("inference: false")
    front.append("tags:")
    front.extend(f"- {t}" for t in TAGS)
    front.append("---")

    diff_ref = repo_id or "PATH_OR_REPO_OF_THIS_DIFF"
    base_line = f"`{base_repo}`" + (f" at revision `{base_rev}`" if base_rev else "") if base_repo else "(no Hub repo recorded)"
    hashes = "\n".join(f"{f.sha256}  {f.path}" for f in manifest.files)
    from ..identity import SIGNATURE_NAME, model_digest

    digest = model_digest({f.path: f.sha256 for f in manifest.files})
    signed = any(f.path == SIGNATURE_NAME for f in manifest.files)
    sign_text = (f"""
The release is signed by its publisher (OpenSSF model signing). Check the signature before
anything is downloaded, and every rebuilt file against it, with the publisher's public key:
`orca-diff apply --diff {diff_ref} --out rebuilt-model --verify-key PUBLISHER.pub`; the rebuilt
folder then verifies with the OpenSSF tool itself:
`model_signing verify key rebuilt-model --signature rebuilt-model/{SIGNATURE_NAME} --public_key PUBLISHER.pub`.
""" if signed else "")
    install, install_note = _install_lines()
    body = f"""
# ⚠️ This is a weight diff, not a model

**Do not load this repo with `from_pretrained`, a pipeline or an inference server: it holds no
weights you can run.** It is an orca-diff diff that turns
**{base_label}** into the fine-tuned model, byte for byte. You need the base model's weights to use it.

| | |
|---|---|
| base | {base_label}: {base_line} |
| base fingerprint | `{manifest.base.fingerprint}` |
| rebuilt model | {len(manifest.files)} files, {_human(manifest.target_bytes)} |
| model digest | `{digest}` (OpenSSF model-signing root digest over every file; `orca-diff fingerprint --model DIR` recomputes it) |
| this diff | {len(manifest.payloads)} payload file{'' if len(manifest.payloads) == 1 else 's'}, {_human(manifest.payload_bytes)}, format version {manifest.format_version}{_reader_note(manifest)} |

## Rebuild the model (one command)

```bash
{install}
orca-diff apply --diff {diff_ref} --out rebuilt-model
```

{install_note}

This downloads the diff and the base named in its manifest from the Hugging Face Hub (only the
files needed, into the standard HF cache), checks the base tensor by tensor before writing
anything, and rebuilds every file of the fine-tuned model. If you already have the base, pass it:
`orca-diff apply --base PATH_TO_BASE --diff {diff_ref} --out rebuilt-model`. Gated bases need an
access request on their Hub page and a login (`hf auth login`, or `HF_TOKEN`).

## Verify

```bash
orca-diff verify --diff "$(orca-diff download {diff_ref} -q)" --model rebuilt-model
```

or, without orca-diff, compare these sha256 sums (`sha256sum -c` in the rebuilt folder):

```
{hashes}
```

{sign_text}
From a checkout of orca-diff, `scripts/download_diff.py`, `scripts/download_base.py` and
`scripts/rebuild.py` do the same steps one at a time.
"""
    text = "\n".join(front) + "\n" + body
    return text + f"\n{CARD_MARK}{hashlib.sha256(text.encode()).hexdigest()[:16]} -->\n"


def is_generated_card(text: str) -> bool:
    """True for a card written by render_card and not edited since (its closing mark still
    matches its text), which ``push`` may replace by a fresh rendering."""
    head, sep, tail = text.rpartition("\n" + CARD_MARK)
    if not sep or not tail.endswith(" -->\n"):
        return False
    return hashlib.sha256(head.encode()).hexdigest()[:16] == tail[: -len(" -->\n")]


__all__ = ["render_card", "is_generated_card", "LIBRARY_NAME", "TAGS"]
