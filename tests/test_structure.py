"""Atomic models: PDB/mmCIF readers, Gaussian maps and analytic projections, the default map."""

from __future__ import annotations

import gzip
import json

import mrcfile
import numpy as np
import pytest

from cdae_em.errors import InputError
from cdae_em.core.geometry import euler_to_matrix
from cdae_em.simulate.structure import Atoms, atoms_to_map, centre, project_atoms, read_atoms


def _pdb_line(record: str, serial: int, name: str, alt: str, res: str, chain: str, seq: int,
              x: float, y: float, z: float, element: str) -> str:
    """One fixed-column PDB ATOM/HETATM record (name given in its 4 columns 13-16)."""
    return (f"{record:<6}{serial:>5} {name:<4}{alt:1}{res:>3} {chain:1}{seq:>4}    "
            f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{20.0:6.2f}          {element:>2}")


PDB_TEXT = "\n".join([
    "HEADER    TEST",
    "MODEL        1",
    _pdb_line("ATOM", 1, " N  ", "", "GLY", "A", 1, 1.0, 2.0, 3.0, "N"),
    _pdb_line("ATOM", 2, " CA ", "", "GLY", "A", 1, 2.0, 2.0, 3.0, "C"),
    _pdb_line("ATOM", 3, " H  ", "", "GLY", "A", 1, 0.5, 2.0, 3.0, "H"),
    _pdb_line("ATOM", 4, " SG ", "A", "CYS", "A", 2, 4.0, 1.0, 0.0, "S"),
    _pdb_line("ATOM", 5, " SG ", "B", "CYS", "A", 2, 4.5, 1.0, 0.0, "S"),
    _pdb_line("ATOM", 6, " O  ", "", "GLY", "A", 1, 3.0, 2.0, 3.0, "").rstrip(),  # blank element
    _pdb_line("HETATM", 7, "ZN  ", "", " ZN", "A", 101, -1.0, -2.0, -3.0, "ZN"),
    _pdb_line("HETATM", 8, " O  ", "", "HOH", "A", 201, 9.0, 9.0, 9.0, "O"),
    "ENDMDL",
    "MODEL        2",
    _pdb_line("ATOM", 1, " N  ", "", "GLY", "A", 1, 50.0, 50.0, 50.0, "N"),
    "ENDMDL",
    "END",
]) + "\n"

CIF_TEXT = """data_test
#
_entry.id TEST
#
loop_
_atom_site.group_PDB
_atom_site.id
_atom_site.type_symbol
_atom_site.label_atom_id
_atom_site.label_alt_id
_atom_site.label_comp_id
_atom_site.label_asym_id
_atom_site.label_seq_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.pdbx_PDB_model_num
ATOM   1 N N     . GLY A 1 1.000 2.000 3.000 1
ATOM   2 C CA    . GLY A 1 2.000 2.000 3.000 1
ATOM   3 H H     . GLY A 1 0.500 2.000 3.000 1
ATOM   4 O "O5'" . DA  B 1 3.000 2.000 3.000 1
ATOM   5 P P     . DA  B 1 -1.0 -2.0 -3.0 1
HETATM 6 O O     . HOH C . 9.000 9.000 9.000 1
ATOM   7 N N     . GLY A 1 50.0 50.0 50.0 2
#
loop_
_atom_type.symbol
C
"""


def test_read_pdb_first_model_heavy_atoms_no_water(tmp_path):
    path = tmp_path / "model.pdb"
    path.write_text(PDB_TEXT)
    atoms = read_atoms(path)
    # N, CA, SG (altloc A only), O (element guessed from the name), ZN; no H, water or model 2
    np.testing.assert_array_equal(atoms.weight, [7, 6, 16, 8, 30])
    np.testing.assert_allclose(atoms.xyz[2], [4.0, 1.0, 0.0])
    np.testing.assert_allclose(atoms.xyz[-1], [-1.0, -2.0, -3.0])
    assert atoms.xyz.dtype == np.float64 and atoms.path == path
    with_water = read_atoms(path, keep_water=True)
    assert len(with_water) == 6 and with_water.weight[-1] == 8


def test_read_gzipped_pdb(tmp_path):
    path = tmp_path / "model.pdb.gz"
    path.write_bytes(gzip.compress(PDB_TEXT.encode()))
    assert len(read_atoms(path)) == 5


def test_read_mmcif(tmp_path):
    path = tmp_path / "model.cif"
    path.write_text(CIF_TEXT)
    atoms = read_atoms(path)
    np.testing.assert_array_equal(atoms.weight, [7, 6, 8, 15])
    np.testing.assert_allclose(atoms.xyz[3], [-1.0, -2.0, -3.0])
    # the format is recognised from the content too
    other = tmp_path / "model.txt"
    other.write_text(CIF_TEXT)
    np.testing.assert_array_equal(read_atoms(other).weight, atoms.weight)


def test_centre_puts_weighted_centre_at_origin():
    atoms = centre(Atoms(xyz=np.array([[0.0, 0, 0], [10.0, 0, 0]]), weight=np.array([6.0, 18.0])))
    np.testing.assert_allclose(atoms.xyz[:, 0], [-7.5, 2.5])
    np.testing.assert_allclose((atoms.xyz * atoms.weight[:, None]).sum(0), 0, atol=1e-12)


@pytest.mark.parametrize(
    "text, suffix, problem",
    [
        (None, ".pdb", "no such file"),
        ("HEADER    NOTHING\nEND\n", ".pdb", "no ATOM/HETATM"),
        ("just some text\n", ".dat", "unknown format"),
        (_pdb_line("ATOM", 1, " X  ", "", "UNK", "A", 1, 0, 0, 0, "XX") + "\n", ".pdb",
         "unknown element"),
        ("data_x\n_cell.length_a 10\n", ".cif", "no _atom_site"),
        (_pdb_line("HETATM", 1, " O  ", "", "HOH", "A", 1, 0, 0, 0, "O") + "\n", ".pdb", "no ATOM"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_file(tmp_path, text, suffix, problem):
    path = tmp_path / f"bad{suffix}"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as err:
        read_atoms(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def _centre_of_mass(a: np.ndarray) -> np.ndarray:
    """Centre of mass of an array, per axis, in index units."""
    grids = np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij")
    return np.array([(g * a).sum() / a.sum() for g in grids])


def test_atoms_to_map_single_atom_position_and_integral():
    box, px = 24, 1.5
    r = np.array([3.0, -1.5, 4.2])  # x, y, z in Angstrom (z off the voxel grid)
    atoms = Atoms(xyz=r[None], weight=np.array([6.0]))
    vol = atoms_to_map(atoms, box, px, resolution=2.5 * px)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    expected_zyx = box // 2 + r[::-1] / px  # x on the last axis
    # sampling a Gaussian of sigma 0.56 voxel biases its centroid by up to ~0.008 voxel
    np.testing.assert_allclose(_centre_of_mass(vol.astype(np.float64)), expected_zyx, atol=1e-2)
    assert np.unravel_index(vol.argmax(), vol.shape) == (15, 11, 14)
    assert vol.sum(dtype=np.float64) == pytest.approx(6.0, rel=1e-5)
    # the default (narrow) resolution keeps the integral: sampled, not point, normalisation
    assert atoms_to_map(atoms, box, px).sum(dtype=np.float64) == pytest.approx(6.0, rel=1e-5)


def test_project_atoms_off_centre_atom_lands_at_rotated_position():
    box, px = 32, 2.0
    r = np.array([9.0, -4.0, 6.0])
    a = euler_to_matrix(np.array([30.0]), np.array([60.0]), np.array([-20.0]))
    atoms = Atoms(xyz=r[None], weight=np.array([8.0]))
    img = project_atoms(atoms, a, box, px, resolution=5.0)
    assert img.shape == (1, box, box) and img.dtype == np.float32
    x, y = (a[0] @ r)[:2]
    np.testing.assert_allclose(_centre_of_mass(img[0].astype(np.float64)),
                               [box // 2 + y / px, box // 2 + x / px], atol=1e-2)
    assert img.sum(dtype=np.float64) == pytest.approx(8.0, rel=1e-5)


def test_project_atoms_matches_z_sum_of_map():
    rng = np.random.default_rng(0)
    box, px = 32, 1.5
    atoms = Atoms(xyz=rng.uniform(-12, 12, (40, 3)), weight=rng.choice([6.0, 7.0, 8.0, 16.0], 40))
    vol = atoms_to_map(atoms, box, px)
    proj = project_atoms(atoms, np.eye(3)[None], box, px)[0]
    assert np.abs(proj - vol.sum(0)).max() / np.abs(proj).max() < 1e-3
    # a rotated view equals the z-sum of the map of the rotated atoms, batched with the identity
    a = euler_to_matrix(np.array([0.0, 70.0]), np.array([0.0, 40.0]), np.array([0.0, 15.0]))
    rotated = Atoms(xyz=atoms.xyz @ a[1].T, weight=atoms.weight)
    projs = project_atoms(atoms, a, box, px, max_elements=1000)  # several chunks of views/atoms
    np.testing.assert_allclose(projs[0], proj, atol=1e-4 * proj.max())
    ref = atoms_to_map(rotated, box, px).sum(0)
    assert np.abs(projs[1] - ref).max() / np.abs(ref).max() < 1e-3


def test_default_map_is_shipped_with_its_provenance():
    from cdae_em.data import default_map_info, default_map_path

    info = default_map_info()
    path = default_map_path()
    assert path.is_file() and path.stat().st_size <= 1_000_000
    with mrcfile.open(path, permissive=False) as mrc:
        data = mrc.data
        voxel = float(mrc.voxel_size.x)
    assert data.shape == (info["box"],) * 3 == (64, 64, 64) and data.dtype == np.float32
    assert voxel == pytest.approx(info["pixel_size"])
    assert data.sum(dtype=np.float64) > 0 and data.min() >= 0
    for key in ("source", "pdb_id", "n_atoms", "resolution", "command"):
        assert key in info
    json.dumps(info)


def test_make_default_map_script_writes_gzipped_map_and_metadata(tmp_path):
    from cdae_em.data.make_default_map import main

    pdb = tmp_path / "model.pdb"
    pdb.write_text(PDB_TEXT)
    out = tmp_path / "small_map.mrc.gz"
    assert main(["--pdb", str(pdb), "--o", str(out), "--box", "16"]) == 0
    info = json.loads((tmp_path / "small_map.json").read_text())
    assert out.read_bytes()[:2] == b"\x1f\x8b" and info["map_bytes"] == out.stat().st_size
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (16, 16, 16)
        assert float(mrc.voxel_size.x) == pytest.approx(info["pixel_size"])
    assert info["n_atoms"] == 5 and info["source"]["file_sha256"]
    assert info["resolution"] == pytest.approx(2.5 * info["pixel_size"])
