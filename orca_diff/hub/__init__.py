"""The Hub side: catalog names, resolution of --base/--diff, downloads, uploads, model cards.

:mod:`.catalog` names, :mod:`.resolve` what a name means, :mod:`.transfer` moves files through
``huggingface_hub`` (cached, verified), :mod:`.card` writes the model card of a diff.
"""

from .transfer import *  # noqa: F401,F403 - the transfer functions are the face of the Hub side
from .transfer import __all__ as _transfer_all

__all__ = list(_transfer_all)
