"""cdae-em: cascade denoising autoencoders for clustering single-particle cryo-EM images.

The core package never imports a workflow framework (RELION, Scipion); the thin adapters for those
live in ``cdae_em.protocols`` (installed from the repository's top-level ``protocols/``).
"""

__version__ = "0.3.0"


def __getattr__(name: str):
    """Scipion plugin hook (PEP 562): pyworkflow imports ``cdae_em`` (entry point group
    ``pyworkflow.plugin``) and calls ``cdae_em.Plugin()``. Resolved lazily so that the core never
    imports Scipion; only this name triggers the import of ``cdae_em.protocols.scipion_plugin``."""
    if name == "Plugin":
        from cdae_em.protocols.scipion_plugin import Plugin

        return Plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
