"""cdae-em: cascade denoising autoencoders for clustering single-particle cryo-EM images.

The core package never imports a workflow framework (RELION, Scipion); the thin adapters for those
live in ``cdae_em.protocols`` (installed from the repository's top-level ``protocols/``).
"""

__version__ = "0.1.0"
