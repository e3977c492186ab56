"""The Scipion plugin class of cdae-em (plugin name ``cdae_em``).

pyworkflow finds the plugin through the ``pyworkflow.plugin`` entry point ``cdae_em``, imports the
module ``cdae_em`` and calls ``cdae_em.Plugin()``; ``cdae_em/__init__.py`` resolves that name
lazily to the class below, so the core package never imports Scipion.

cdae-em is a pip package that runs in Scipion's own Python, so there are no binaries to install:
the protocols run ``<Scipion python> -m cdae_em run ...``. Set ``CDAE_EM_COMMAND`` (in
``scipion.conf`` or the environment) to run another installation instead, e.g. one in a conda
environment with a CUDA build of PyTorch: ``CDAE_EM_COMMAND="conda run -n cdae cdae-em"``.
"""

from __future__ import annotations

import os
import sys

import pwem
import pyworkflow.utils as pwutils

import cdae_em

#: variable that overrides the command that runs cdae-em
CDAE_EM_COMMAND = "CDAE_EM_COMMAND"
PLUGIN_NAME = "cdae_em"


def _package_dir(module) -> str:
    return os.path.dirname(os.path.abspath(module.__file__))


class Plugin(pwem.Plugin):
    _url = "https://doi.org/10.3389/fgene.2020.627746"
    _supportedVersions = [cdae_em.__version__]
    _processingField = ["SPA"]

    def __init__(self):
        super().__init__()
        # pyworkflow's default name is the module the class is defined in; ours is the package
        self._name = PLUGIN_NAME

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(CDAE_EM_COMMAND, "",
                       description="Command that runs cdae-em (default: the Python that runs "
                                   "Scipion, as `python -m cdae_em`).")

    @classmethod
    def getEnviron(cls):
        environ = pwutils.Environ(os.environ)
        if cls.getVar(CDAE_EM_COMMAND) and "PYTHONPATH" in environ:
            del environ["PYTHONPATH"]  # another Python environment must not see Scipion's packages
        return environ

    @classmethod
    def defineBinaries(cls, env):
        """Nothing to install: cdae-em is the pip package this plugin lives in."""

    @classmethod
    def getProgram(cls) -> str:
        """The command that runs ``cdae-em`` (its subcommand and arguments follow)."""
        custom = cls.getVar(CDAE_EM_COMMAND)
        return custom if custom else f'"{sys.executable}" -m cdae_em'

    @classmethod
    def validateInstallation(cls):
        return []

    def getPath(self) -> str:
        """The plugin package folder (``cdae_em``), not the module that defines this class."""
        if self._path is None:
            self._path = _package_dir(cdae_em)
        return self._path

    def getPluginTemplateDir(self) -> str:
        """``cdae_em.templates`` (installed from the repository's ``templates/``; with an editable
        install it is not a subfolder of ``cdae_em``)."""
        import cdae_em.templates

        return _package_dir(cdae_em.templates)
