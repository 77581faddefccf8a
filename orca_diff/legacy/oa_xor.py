"""OpenAssistant XOR releases: every file of the model XORed byte for byte with the user's base.

What ``scripts/xor-codec/xor_codec.py`` (LAION-AI/Open-Assistant, ``xor_dir`` with the default
``compress=False``, i.e. ``xor_uncompressed``) does, and so what this module does:

* ``added_tokens.json`` is copied from the payload folder first;
* then for every entry of the payload folder (``os.listdir``) the output file is
  ``payload XOR base`` of the same name, where the base is zero-padded when shorter than the
  payload and truncated when longer (so the output is exactly as long as the payload); an entry
  without a same-named base file (or a folder) raises inside the script, which prints
  "Exception when processing" and skips it — so ``added_tokens.json`` keeps its copy.

The result is therefore right only if the user's converted ``.bin`` files are byte-identical to
OpenAssistant's, which depends on the transformers/torch versions used for the conversion. The
release's model card publishes md5 sums of the converted base files and of the results; orca-diff
checks the base files against them BEFORE writing anything (from the catalog entry, or parsed from
the release's README.md), refuses a mismatching base naming the conversion the release expects,
and after the XOR checks the results' md5 sums and that every rebuilt file is a loadable
checkpoint. The output files are the script's output byte for byte (``.bin``, not safetensors).
Streaming: 16 MiB blocks (the result does not depend on the block size).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import BaseMismatchError, FormatError, InputNotFoundError, OrcaDiffError, VerificationError
from ..progress import byte_bar
from .common import LegacyReport, SafetensorsWriter, state_dict_order

BLOCK_BYTES = 16 << 20
COPIED_FIRST = "added_tokens.json"
DEFAULT_EXPECTS = ("LLaMA converted to HF .bin files exactly as the release's model card says (for"
                   " OpenAssistant/oasst-sft-6-llama-30b-xor: transformers commit d04ec99bec8a0b432fc03ed60cea9a1a20ebaf3c,"
                   " Python 3.10, torch 1.13.1, accelerate 0.18.0, sentencepiece 0.1.98, protobuf 3.20.1)")
_MD5_LINE = re.compile(r"^\s*([0-9a-fA-F]{32})\s+\*?(?:\./)?([^\s/]+)\s*$")
_FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def looks_like_xor_payload(folder: Path) -> bool:
    """True for a folder (or a Hub snapshot holding one) whose config.json is not JSON: an XOR
    payload. Every other model folder, including FastChat and Alpaca releases, has real JSON."""
    if not folder.is_dir():
        return False
    try:
        folder = payload_folder(folder)
    except (OrcaDiffError, OSError):
        return False
    cfg = folder / "config.json"
    if not cfg.is_file() or not any(folder.glob("*.bin")):
        return False
    try:
        json.loads(cfg.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return True
    return False


def payload_folder(root: Path) -> Path:
    """The folder holding the XOR files: ``root`` itself, or its one subfolder that holds .bin
    files (the Hub repos keep them in ``<repo-name>/``)."""
    if any(root.glob("*.bin")):
        return root
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.bin"))]
    if len(subs) == 1:
        return subs[0]
    raise InputNotFoundError(f"{root}: no XOR payload found (a folder of XORed pytorch_model-*.bin files)"
                             + (f"; several candidates: {[p.name for p in subs]}" if subs else ""))


def published_md5(payload: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(base md5s, output md5s) as the release's README.md lists them in ``md5sum`` format.

    The card lists, in this order, Meta's original files, the converted base files, and the
    final files; names appear in both of the last two lists, so the first code block listing
    ``pytorch_model-*.bin`` is the base, the next one the output. Blocks listing
    ``consolidated.*.pth`` (Meta's originals) are skipped."""
    for readme in (payload / "README.md", payload.parent / "README.md"):
        if readme.is_file():
            break
    else:
        return {}, {}
    blocks = []
    for body in _FENCE.findall(readme.read_text(encoding="utf-8", errors="replace")):
        sums = {m.group(2): m.group(1).lower() for line in body.splitlines() if (m := _MD5_LINE.match(line))}
        if sums and not any(n.startswith("consolidated.") for n in sums) and any(n.endswith(".bin") for n in sums):
            blocks.append(sums)
    return (blocks[0] if blocks else {}), (blocks[1] if len(blocks) > 1 else {})


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(BLOCK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def xor_file(payload: Path, base: Path, out: Path, bar: Any) -> str:
    """``out = payload XOR base`` with xor_codec's padding rules; returns the output's md5."""
    import numpy as np

    h = hashlib.md5()
    with open(payload, "rb") as fp, open(base, "rb") as fb, open(out, "xb") as fo:
        while True:
            a = np.frombuffer(fp.read(BLOCK_BYTES), dtype=np.uint8)
            if not len(a):
                break
            b = np.frombuffer(fb.read(len(a)), dtype=np.uint8)  # base past its end reads as zeros
            x = a.copy()
            x[: len(b)] ^= b
            fo.write(x.data)
            h.update(x.data)
            bar.update(len(a))
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def rebuild(base_dir: Path, payload_dir: Path, out_dir: Path, *, entry: dict[str, Any], threads: int | None,
            progress: bool | None, check_integrity: bool = True) -> LegacyReport:
    """Write ``payload XOR base`` for every payload file (xor_codec.py's decode) into ``out_dir``."""
    legacy = entry.get("legacy") or {}
    payload_dir = payload_folder(payload_dir)
    if not base_dir.is_dir():
        raise InputNotFoundError(f"{base_dir}: the base must be the folder of your converted LLaMA files")
    expects = legacy.get("expects") or DEFAULT_EXPECTS
    checks: list[str] = []
    notes: list[str] = []
    entries = sorted(os.listdir(payload_dir))
    todo: list[str] = []
    for name in entries:
        p = payload_dir / name
        if not p.is_file() or name.startswith(".") or name == "README.md":
            continue
        if (base_dir / name).is_file():
            todo.append(name)
        elif name.endswith(".bin"):
            have = sorted(q.name for q in base_dir.glob("*.bin"))
            raise BaseMismatchError(f"base {base_dir}: has no {name}, which the XOR release needs (found {have or 'no .bin files'});"
                                    f" nothing was written. The release expects {expects}")
        elif name != COPIED_FIRST:
            notes.append(f"{name}: no such file in the base; skipped, as xor_codec.py does")

    base_md5, out_md5 = legacy.get("base_md5") or {}, legacy.get("output_md5") or {}
    if not base_md5 and not out_md5:
        base_md5, out_md5 = published_md5(payload_dir)
    if check_integrity and base_md5:
        bad = []
        for name in todo:
            want = base_md5.get(name)
            if want and md5_file(base_dir / name) != want.lower():
                bad.append(name)
        if bad:
            raise BaseMismatchError(
                f"base {base_dir}: md5 of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} ({len(bad)} of"
                f" {len(todo)} files) differs from the release's published list; an XOR release rebuilds garbage from"
                f" any other bytes, so nothing was written. The release expects {expects}. Convert again that way,"
                " or use an orca-diff re-publication of this release (`orca-diff convert`), which accepts any"
                " conversion with the same tensors")
        checks.append(f"md5 of {sum(1 for n in todo if n in base_md5)} base files match the release's published list")
    elif check_integrity:
        notes.append("no published md5 list found for the base files (catalog entry or README.md): the base could"
                     " not be checked before the XOR")

    written = 0
    sizes = {n: (payload_dir / n).stat().st_size for n in todo}
    md5s: dict[str, str] = {}
    with byte_bar(sum(sizes.values()), "xor", progress) as bar:
        if (payload_dir / COPIED_FIRST).is_file():
            shutil.copyfile(payload_dir / COPIED_FIRST, out_dir / COPIED_FIRST)
            if COPIED_FIRST not in todo:
                written += (out_dir / COPIED_FIRST).stat().st_size
        for name in todo:
            if name == COPIED_FIRST:
                (out_dir / name).unlink()  # the script then overwrites its copy with the XOR
            md5s[name] = xor_file(payload_dir / name, base_dir / name, out_dir / name, bar)
            written += sizes[name]

    if check_integrity and out_md5:
        bad = [n for n in todo if out_md5.get(n) and out_md5[n].lower() != md5s[n]]
        if bad:
            raise VerificationError(f"rebuilt {', '.join(bad[:3])} ({len(bad)} files): md5 differs from the release's"
                                    f" published result although the base files passed; nothing was kept. Is the"
                                    " payload download complete?")
        checks.append(f"md5 of {sum(1 for n in todo if n in out_md5)} rebuilt files match the release's published list")
    checks.append(_check_loadable(out_dir, expects))
    files = sum(1 for p in out_dir.iterdir() if p.is_file())
    return LegacyReport(out_dir, "oa-xor", files, written, 0.0, None, checks, notes)


def _check_loadable(out_dir: Path, expects: str) -> str:
    """Every rebuilt checkpoint must unpickle (weights only) and the config must be JSON: an XOR
    against the wrong bytes yields noise that fails here, instead of a model that talks garbage."""
    cfg = out_dir / "config.json"
    if cfg.is_file():
        try:
            json.loads(cfg.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise VerificationError(f"{cfg}: rebuilt config is not JSON: the base's config.json is not the one the"
                                    f" release was made against. The release expects {expects}") from None
    if not any(out_dir.glob("*.bin")):
        return "rebuilt config is valid JSON"
    from ..containers import open_model

    try:
        model = open_model(out_dir)
    except OrcaDiffError as exc:
        raise VerificationError(f"a rebuilt checkpoint is not loadable ({exc}): the base files are not byte-identical"
                                f" to the ones the release was made against. The release expects {expects}") from None
    n = len(model.tensors)
    model.close()
    return f"every rebuilt .bin loads as a weights-only checkpoint ({n} tensors)"


def resave_as_safetensors(folder: Path) -> str:
    """Replace the ``.bin`` files of a rebuilt model by safetensors shards (same tensors, same
    bytes), one tensor at a time, for ``convert`` (orca-diff diffs describe safetensors files)."""
    from ..containers import open_model
    from ..containers.pickled import INDEX_NAME

    model = open_model(folder)
    try:
        names = state_dict_order(model.tensors)
        writer = SafetensorsWriter(folder, [model.tensors[n] for n in names])
        try:
            for n in names:
                writer.begin(n)
                writer.write(model.read(n))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        model.close()
    bins = sorted(folder.glob("*.bin"))
    for p in bins:
        p.unlink()
    (folder / INDEX_NAME).unlink(missing_ok=True)
    if not names:
        raise FormatError(f"{folder}: the rebuilt model holds no tensors")
    return (f"the rebuilt {len(bins)} .bin files were re-saved as safetensors for the orca-diff diff: same tensors,"
            " bit for bit; apply of the new diff writes safetensors, not the .bin containers")


__all__ = ["rebuild", "published_md5", "payload_folder", "looks_like_xor_payload", "xor_file", "resave_as_safetensors"]
