"""Install cdae-em.

Layout: the core package is ``cdae_em/``; the repository's top-level ``protocols/`` (framework
adapters: RELION External job, Scipion protocols) and ``templates/`` (RELION job.star, Scipion
workflow templates) are installed *inside* it as ``cdae_em.protocols`` and ``cdae_em.templates``.
That is where Scipion looks for a plugin's protocols and templates (plugin ``cdae_em``), and it
keeps one importable package for all three ways of running. The core never imports them.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "cdae_em" / "__init__.py").read_text()).group(1)

setup(
    name="cdae-em",
    version=VERSION,
    description="Cascade denoising autoencoders for 2D classification of cryo-EM particles "
    "(STAR in, STAR out; RELION External job and Scipion plugin)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    # PEP 639: an SPDX expression (METADATA's License-Expression) and the licence file in
    # dist-info. setuptools >= 77 refuses a "License ::" classifier next to an expression, and
    # with the old free-text `license=` it warns that such classifiers are deprecated.
    license_expression="GPL-3.0-or-later",
    license_files=["LICENSE"],
    classifiers=[
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
    python_requires=">=3.10",
    packages=["cdae_em", "cdae_em.io", "cdae_em.runtime", "cdae_em.core", "cdae_em.simulate", "cdae_em.denoise",
              "cdae_em.classify", "cdae_em.job", "cdae_em.commands", "cdae_em.data", "cdae_em.protocols",
              "cdae_em.templates"],
    package_dir={
        "cdae_em": "cdae_em",
        "cdae_em.protocols": "protocols",
        "cdae_em.templates": "templates",
    },
    package_data={
        "cdae_em.data": ["*.mrc.gz", "*.md", "*.json", "*.pt", "*.npz"],
        "cdae_em.templates": ["*.star", "*.json.template"],
    },
    install_requires=[
        # any torch >= 2.1 works; users bring the build (CPU or CUDA) that fits their machine
        "torch>=2.1",
        "numpy>=1.24",
        "pandas>=1.5",
        "mrcfile>=1.4",
        "starfile>=0.5",
        "emtable>=0.0.14",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "matplotlib>=3.5",  # gallery.png
    ],
    extras_require={
        # the benchmark smoke test compares against scikit-image's TV/NLM and BM3D
        "test": ["pytest>=7", "scikit-image>=0.22", "bm3d>=4"],
        "bench": ["scikit-image>=0.22", "bm3d>=4"],
        # approximate kNN for many queries (cdae_em.core.knn; exact search is used without it)
        "scale": ["faiss-cpu>=1.7"],
        # Scipion plugin (plugin name ``cdae_em``). pyworkflow pins numpy==1.26.1, so install this
        # extra in the same pip command as cdae-em: pip install 'cdae-em[scipion]'
        "scipion": ["scipion-pyworkflow>=3.11", "scipion-em>=3.11"],
    },
    entry_points={
        "console_scripts": [
            "cdae-em = cdae_em.cli:main",
            "cdae-em-relion = cdae_em.protocols.relion_external:main",
        ],
        # Scipion imports the entry point's *name* as the plugin module and calls its ``Plugin``
        # (resolved lazily in cdae_em/__init__.py, so the core never needs Scipion).
        "pyworkflow.plugin": [
            "cdae_em = cdae_em",
        ],
    },
)
