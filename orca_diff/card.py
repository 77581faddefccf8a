"""The model card (README.md) written into every diff: it says loudly that this is not a model."""

from __future__ import annotations

from .format import Manifest


def render_card(manifest: Manifest) -> str:
    base = manifest.base.repo or manifest.base.name or "the base model"
    front = ["---", "library_name: orca-diff", "inference: false", "tags:", "- orca-diff", "- weight-diff"]
    if manifest.base.repo:
        front.append(f"base_model: {manifest.base.repo}")
    front.append("---")
    body = f"""
# This is a weight diff, not a model

Loading this folder with `from_pretrained` will not work: it holds an
[orca-diff](https://pypi.org/project/orca-diff/) diff against **{base}**
(base fingerprint `{manifest.base.fingerprint}`), never base weights.

Rebuild the model (byte-identical to the publisher's files):

```bash
pip install orca-diff
orca-diff apply --base PATH_TO_{base.split('/')[-1].upper().replace('-', '_')} --diff THIS_DIFF --out rebuilt-model
orca-diff verify --diff THIS_DIFF --model rebuilt-model
```
"""
    return "\n".join(front) + "\n" + body
