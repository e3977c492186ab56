"""Framework adapters (installed as ``cdae_em.protocols``): thin wrappers around the core job.

Nothing here is imported by the core package.
"""
