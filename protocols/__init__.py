"""Framework adapters (installed as ``cdae_em.protocols``): thin wrappers around the core job.

Nothing here is imported by the core package.

Scipion: pyworkflow imports this package (the plugin ``cdae_em``'s protocols) and keeps the
Protocol classes *defined* in its submodules. They are imported here only when Scipion is running
(``pwem`` already imported), so that the RELION wrapper and the command line never import Scipion;
outside Scipion they are still reachable by name (``cdae_em.protocols.ProtCdaeDenoiseClassify2D``),
which imports them on first use.
"""

import importlib
import sys

#: Scipion classes exported here -> the module that defines them
_SCIPION_CLASSES = {
    "ProtCdaeDenoiseClassify2D": "protocol_classify2d",
}

if "pwem" in sys.modules:  # being scanned by Scipion (the plugin class imports pwem first)
    from .protocol_classify2d import ProtCdaeDenoiseClassify2D  # noqa: F401


def __getattr__(name):
    module = _SCIPION_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
