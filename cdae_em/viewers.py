"""Scipion viewers of the plugin ``cdae_em`` (pyworkflow looks for them in ``<plugin>.viewers``).

Only pyworkflow imports this module; the viewer is implemented in ``cdae_em.protocols.viewer``.
pyworkflow keeps the classes *defined* here, hence the subclass.
"""

from cdae_em.protocols.viewer import CdaeViewer as _CdaeViewer


class CdaeViewer(_CdaeViewer):
    __doc__ = _CdaeViewer.__doc__
