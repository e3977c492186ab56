"""Data shipped with cdae-em: the default 3D map used for simulations and demos.

The map is built from a public atomic model by ``python -m cdae_em.data.make_default_map``; its
provenance (source archive, checksum, parameters, command) is in ``default_map.json`` and
``PROVENANCE.md`` next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_MAP = "default_map.mrc.gz"
DEFAULT_MAP_INFO = "default_map.json"


def default_map_path() -> Path:
    """Path of the embedded default map (gzipped MRC, 64^3 float32; ``mrcfile.open`` reads it)."""
    return DATA_DIR / DEFAULT_MAP


def default_map_info() -> dict:
    """Metadata of the default map: source, atoms, pixel size, box, resolution, command."""
    return json.loads((DATA_DIR / DEFAULT_MAP_INFO).read_text())
