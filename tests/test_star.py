"""Particle STAR files: RELION 3.0 / 3.1 / cryoSPARC-converted round trips and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from cdae_em.errors import InputError
from cdae_em.io.star import new_particle_table, read_particles, write_star

# As written by RELION 3.0 (Extract, then Select)
RELION30 = """
data_

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnImageName #3 
_rlnMicrographName #4 
_rlnVoltage #5 
_rlnDefocusU #6 
_rlnDefocusV #7 
_rlnDefocusAngle #8 
_rlnSphericalAberration #9 
_rlnCtfBfactor #10 
_rlnCtfScalefactor #11 
_rlnPhaseShift #12 
_rlnAmplitudeContrast #13 
_rlnMagnification #14 
_rlnDetectorPixelSize #15 
_rlnCtfMaxResolution #16 
_rlnCtfFigureOfMerit #17 
_rlnGroupNumber #18 
  1219.000000  3354.000000 000001@Extract/job005/Movies/mic1.mrcs MotionCorr/job002/Movies/mic1.mrc   300.000000 10864.146484 10575.793945    77.995712     2.700000     0.000000     1.000000     0.000000     0.100000 10000.000000     1.770000     4.565916     0.131419            1 
  1440.000000  2974.000000 000002@Extract/job005/Movies/mic1.mrcs MotionCorr/job002/Movies/mic1.mrc   300.000000 10864.146484 10575.793945    77.995712     2.700000     0.000000     1.000000     0.000000     0.100000 10000.000000     1.770000     4.565916     0.131419            1 
   573.000000   388.000000 000001@Extract/job005/Movies/mic2.mrcs MotionCorr/job002/Movies/mic2.mrc   300.000000 14129.382812 13792.270508    83.281487     2.700000     0.000000     1.000000     0.000000     0.100000 10000.000000     1.770000     3.989160     0.149702            2 
 
"""

# As written by RELION 3.1 / 4.0 (Extract, then Select)
RELION31 = """
# version 30001

data_optics

loop_ 
_rlnOpticsGroupName #1 
_rlnOpticsGroup #2 
_rlnMtfFileName #3 
_rlnMicrographOriginalPixelSize #4 
_rlnVoltage #5 
_rlnSphericalAberration #6 
_rlnAmplitudeContrast #7 
_rlnImagePixelSize #8 
_rlnImageSize #9 
_rlnImageDimensionality #10 
opticsGroup1            1 mtf_k2_200kV.star     0.885000   200.000000     1.400000     0.100000     1.770000           64            2 
opticsGroup2            2 mtf_k2_200kV.star     0.885000   200.000000     1.400000     0.100000     3.540000           32            2 
 

# version 30001

data_particles

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnAutopickFigureOfMerit #3 
_rlnClassNumber #4 
_rlnAnglePsi #5 
_rlnImageName #6 
_rlnMicrographName #7 
_rlnOpticsGroup #8 
_rlnCtfMaxResolution #9 
_rlnCtfFigureOfMerit #10 
_rlnDefocusU #11 
_rlnDefocusV #12 
_rlnDefocusAngle #13 
_rlnCtfBfactor #14 
_rlnCtfScalefactor #15 
_rlnPhaseShift #16 
  1219.000000  3354.000000     1.329644            1    -999.0000 000001@Extract/job005/Movies/20170629_00021_frameImage.mrcs MotionCorr/job002/Movies/20170629_00021_frameImage.mrc            1     4.565916     0.131419 10864.146484 10575.793945    77.995712     0.000000     1.000000     0.000000 
  1440.000000  2974.000000     1.172212            1    -999.0000 000002@Extract/job005/Movies/20170629_00021_frameImage.mrcs MotionCorr/job002/Movies/20170629_00021_frameImage.mrc            1     4.565916     0.131419 10864.146484 10575.793945    77.995712     0.000000     1.000000     0.000000 
   573.000000   388.000000     1.021556            1    -999.0000 000001@Extract/job005/Movies/20170629_00022_frameImage.mrcs MotionCorr/job002/Movies/20170629_00022_frameImage.mrc            2     3.989160     0.149702 14129.382812 13792.270508    83.281487     0.000000     1.000000    12.500000 
 
"""

# As written by pyem's csparc2star.py from a cryoSPARC job (3.0 style, extra non-RELION columns)
CRYOSPARC30 = """
data_images

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnPhaseShift #9
_rlnDetectorPixelSize #10
_rlnMagnification #11
_rlnCoordinateX #12
_rlnCoordinateY #13
_ucsfUid #14
_ucsfParticleBlobIdx #15
_ucsfImagePath #16
1@J12/extract/001_mic_patch_aligned_doseweighted_particles.mrc	J5/motioncorrected/001_mic_patch_aligned_doseweighted.mrc	12345.678711	12001.500977	-45.250000	300.000000	2.700000	0.070000	0.000000	1.096000	10000.000000	512.000000	640.000000	5961381413625478185	0	J12/extract/001_mic_patch_aligned_doseweighted_particles.mrc
2@J12/extract/001_mic_patch_aligned_doseweighted_particles.mrc	J5/motioncorrected/001_mic_patch_aligned_doseweighted.mrc	12345.678711	12001.500977	-45.250000	300.000000	2.700000	0.070000	0.000000	1.096000	10000.000000	800.000000	96.000000	1120047325437227131	1	J12/extract/001_mic_patch_aligned_doseweighted_particles.mrc
"""

# As written by pyem's csparc2star.py --relion2 omitted (3.1 style), with extra cryoSPARC columns
CRYOSPARC31 = """
# version 30001

data_optics

loop_
_rlnVoltage #1
_rlnSphericalAberration #2
_rlnAmplitudeContrast #3
_rlnOpticsGroup #4
_rlnImageSize #5
_rlnImagePixelSize #6
_rlnOpticsGroupName #7
300.000000	2.700000	0.070000	1	128	1.096000	opticsGroup1

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnPhaseShift #6
_rlnOpticsGroup #7
_rlnClassNumber #8
_rlnAnglePsi #9
_rlnOriginXAngst #10
_rlnOriginYAngst #11
_ucsfUid #12
_ucsfParticleBlobIdx #13
000001@J12/extract/001_particles.mrcs	J5/motioncorrected/001.mrc	12345.678711	12001.500977	-45.250000	0.000000	1	3	12.500000	1.096000	-2.192000	5961381413625478185	0
000002@J12/extract/001_particles.mrcs	J5/motioncorrected/001.mrc	15000.000000	14800.000000	10.000000	0.000000	1	1	-170.250000	0.000000	0.548000	1120047325437227131	1
"""


def write(tmp_path, text, name="particles.star"):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_same_blocks(a: dict, b: dict) -> None:
    """Same block names and order, columns, dtypes and values."""
    assert list(a) == list(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-6)


@pytest.mark.parametrize("text,flavour,key", [
    (RELION30, "3.0", ""),
    (RELION31, "3.1", "particles"),
    (CRYOSPARC30, "3.0", "images"),
    (CRYOSPARC31, "3.1", "particles"),
])
def test_round_trip_keeps_every_block_column_and_dtype(tmp_path, text, flavour, key):
    src = write(tmp_path, text)
    table = read_particles(src)
    assert (table.flavour, table.particles_key, len(table)) == (flavour, key, len(table.particles))
    out = tmp_path / "out" / "particles.star"
    out.parent.mkdir()
    write_star(table, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["particles.star"]  # no temp file left
    assert_same_blocks(starfile.read(src, always_dict=True), starfile.read(out, always_dict=True))
    again = read_particles(out)
    assert again.flavour == flavour
    assert_same_blocks(table.blocks, again.blocks)
    assert again.particles["rlnImageName"].tolist() == table.particles["rlnImageName"].tolist()
    if "ucsfUid" in table.particles:  # 64-bit cryoSPARC uids survive exactly
        assert again.particles["ucsfUid"].tolist() == table.particles["ucsfUid"].tolist()


def test_relion30_stays_30(tmp_path):
    table = read_particles(write(tmp_path, RELION30))
    assert table.optics is None and table.version_line is None
    write_star(table.with_columns(optics={"rlnImageSize": 64}), tmp_path / "out.star")
    text = (tmp_path / "out.star").read_text()
    assert "data_optics" not in text and "# version" not in text
    back = starfile.read(tmp_path / "out.star")
    assert isinstance(back, pd.DataFrame)  # one block
    assert (back["rlnImageSize"] == 64).all()
    assert back["rlnImageName"].iloc[0] == "000001@Extract/job005/Movies/mic1.mrcs"


@pytest.mark.parametrize("version", ["# version 30001", "# version 50001"])
def test_relion31_version_line_before_every_block(tmp_path, version):
    table = read_particles(write(tmp_path, RELION31.replace("# version 30001", version)))
    assert table.version_line == version
    write_star(table, tmp_path / "out.star")
    lines = (tmp_path / "out.star").read_text().splitlines()
    for block in ("data_optics", "data_particles"):
        i = lines.index(block)
        assert lines[i - 2 : i] == [version, ""]


def test_per_particle_merges_optics(tmp_path):
    info = read_particles(write(tmp_path, RELION31)).per_particle()
    assert info["rlnImagePixelSize"].tolist() == [1.77, 1.77, 3.54]
    assert info["rlnImageSize"].tolist() == [64, 64, 32]
    assert info["rlnVoltage"].tolist() == [200.0] * 3
    assert info["rlnPhaseShift"].tolist() == [0.0, 0.0, 12.5]
    assert info["rlnDefocusU"].iloc[2] == pytest.approx(14129.382812)


def test_per_particle_relion30_and_defaults(tmp_path):
    info = read_particles(write(tmp_path, RELION30)).per_particle()
    assert info["rlnImagePixelSize"].tolist() == pytest.approx([1.77] * 3)  # 1.77 um at 10000x
    assert info["rlnImageSize"].isna().all()
    minimal = write(tmp_path, "data_\nloop_\n_rlnImageName #1\n1@a.mrcs\n", "minimal.star")
    info = read_particles(minimal).per_particle()
    assert info["rlnImagePixelSize"].isna().all() and info["rlnDefocusU"].isna().all()
    assert info["rlnPhaseShift"].tolist() == [0.0]


def test_with_columns_adds_at_end_and_replaces_in_place(tmp_path):
    table = read_particles(write(tmp_path, RELION31))
    columns = list(table.particles.columns)
    new = table.with_columns(
        particles={"rlnClassNumber": [4, 5, 6], "rlnImageOriginalName": ["1@x.mrcs"] * 3},
        optics={"rlnImageSize": 48},
    )
    assert list(new.particles.columns) == columns + ["rlnImageOriginalName"]
    assert new.particles["rlnClassNumber"].tolist() == [4, 5, 6]
    assert new.optics["rlnImageSize"].tolist() == [48, 48]
    assert table.particles["rlnClassNumber"].tolist() == [1, 1, 1]  # the original is untouched
    write_star(new, tmp_path / "out.star")
    back = starfile.read(tmp_path / "out.star")
    assert back["particles"]["rlnClassNumber"].dtype == np.int64
    assert back["optics"]["rlnImageSize"].tolist() == [48, 48]
    with pytest.raises(ValueError):
        table.with_columns(particles={"rlnClassNumber": [1, 2]})


def test_names_stay_strings(tmp_path):
    text = "data_\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n_rlnGroupName #3\n1@a.mrcs 0001 007\n2@a.mrcs 0002 008\n"
    table = read_particles(write(tmp_path, text))
    write_star(table, tmp_path / "out.star")
    back = read_particles(tmp_path / "out.star").particles
    assert back["rlnMicrographName"].tolist() == ["0001", "0002"]
    assert back["rlnGroupName"].tolist() == ["007", "008"]


def test_new_particle_table_is_relion31(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [2.0], "rlnImageSize": [16]})
    particles = pd.DataFrame({"rlnImageName": ["1@sim.mrcs", "2@sim.mrcs"], "rlnOpticsGroup": [1, 1]})
    write_star(new_particle_table(particles, optics), tmp_path / "sim.star")
    text = (tmp_path / "sim.star").read_text()
    assert text.count("# version 30001") == 2
    table = read_particles(tmp_path / "sim.star")
    assert table.flavour == "3.1" and table.per_particle()["rlnImagePixelSize"].tolist() == [2.0, 2.0]


def test_particle_block_found_by_image_name(tmp_path):
    text = RELION31.replace("data_particles", "data_images")
    table = read_particles(write(tmp_path, text))
    assert table.particles_key == "images" and table.flavour == "3.1"


NO_GROUP = """
data_optics
loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
1 1.0
2 2.0

data_particles
loop_
_rlnImageName #1
1@a.mrcs
"""


@pytest.mark.parametrize("text,problem", [
    (None, "file not found"),
    ("this is not a STAR file\n", "no data_ block"),
    ("data_optics\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n1 1.0\n", "no particle table: no block has an rlnImageName column"),
    ("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1.0 2.0\n", "no particle table"),
    ("data_particles\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n", "empty particle table"),
    ("data_\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@a.mrcs 1.0 3.0\n", "cannot parse"),
    (RELION31.replace("000001@Extract/job005/Movies/20170629_00022_frameImage.mrcs MotionCorr/job002/Movies/20170629_00022_frameImage.mrc            2",
                      "000001@Extract/job005/Movies/20170629_00022_frameImage.mrcs MotionCorr/job002/Movies/20170629_00022_frameImage.mrc            3"),
     "(row 3): unknown optics group 3"),
    (NO_GROUP, "no rlnOpticsGroup column but data_optics has 2 groups"),
])
def test_bad_star_files(tmp_path, text, problem):
    path = tmp_path / "bad.star"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as err:
        read_particles(path)
    assert str(err.value).startswith(str(path))
    assert problem in str(err.value)
    assert "\n" not in str(err.value)


def test_binary_file_is_not_a_star_file(tmp_path):
    path = tmp_path / "stack.mrcs"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="stack.mrcs"):
        read_particles(path)


def test_single_optics_group_without_particle_column(tmp_path):
    text = NO_GROUP.replace("2 2.0\n", "")
    table = read_particles(write(tmp_path, text))
    assert table.per_particle()["rlnImagePixelSize"].tolist() == [1.0]
