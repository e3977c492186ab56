"""Particle images: lazy reading from many stacks in any order, streamed writing, maps."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from cdae_em.io import images as stacks_images
from cdae_em.errors import InputError
from cdae_em.io.stacks import StackWriter, read_map, write_map, write_stack
from cdae_em.io.images import ImageSource, parse_image_name
from cdae_em.io.star import read_particles


@pytest.mark.parametrize("name,expected", [
    ("12@Extract/job005/a.mrcs", (11, "Extract/job005/a.mrcs")),
    ("000001@/abs/b.mrcs", (0, "/abs/b.mrcs")),
    ("single.mrc", (0, "single.mrc")),
])
def test_parse_image_name(name, expected):
    assert parse_image_name(name) == expected


@pytest.mark.parametrize("name", ["0@a.mrcs", "x@a.mrcs", "-1@a.mrcs", "3@"])
def test_parse_image_name_rejects_bad_index(name):
    with pytest.raises(ValueError):
        parse_image_name(name)


def test_shuffled_multi_stack_reads_exact_images(particle_project, monkeypatch):
    star, expected = particle_project.standard()
    monkeypatch.chdir(particle_project.root)  # RELION runs jobs from the project directory
    with ImageSource(star) as source:
        assert (source.n, source.box, len(source.stacks)) == (len(expected), 16, 5)
        assert source.voxel_size == pytest.approx(1.77)
        for batch_size in (1, 7, 1000):
            got = np.concatenate([images for _, images in source.batches(batch_size)])
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected)
        starts = [start for start, _ in source.batches(7)]
        assert starts == list(range(0, len(expected), 7))
        rows = np.array([5, 0, 5, len(expected) - 1, 3, 2, 1])  # any order, repeats
        np.testing.assert_array_equal(source.read(rows), expected[rows])
        assert source.read([]).shape == (0, 16, 16)
        with pytest.raises(IndexError):
            source.read([len(expected)])


def test_big_endian_stack_and_unsupported_mode(particle_project):
    images = np.stack([particle_project.image(1, i) for i in range(3)])
    with mrcfile.new(particle_project.root / "be.mrcs", data=images.astype(">f4")) as mrc:
        mrc.set_image_stack()
    with mrcfile.new(particle_project.root / "cx.mrcs", data=images.astype(np.complex64)) as mrc:
        mrc.set_image_stack()
    star = particle_project.write_star("be.star", ["3@be.mrcs", "1@be.mrcs"])
    source = ImageSource(star, project_dir=particle_project.root)
    np.testing.assert_array_equal(source.read([0, 1]), images[[2, 0]])
    star = particle_project.write_star("cx.star", ["1@cx.mrcs"])
    _expect_input_error(star, particle_project.root, "cx.mrcs", "unsupported MRC mode 4")


def test_sorted_stack_reads_as_slices(particle_project):
    """The common case: particles in stack order, read in runs (and the LRU of open stacks)."""
    names = []
    for s in range(3):
        particle_project.add_stack(f"Extract/s{s}.mrcs", s, 20)
        names += [f"{i + 1}@Extract/s{s}.mrcs" for i in range(20)]
    star = particle_project.write_star("particles.star", names)
    source = ImageSource(star, project_dir=particle_project.root)
    expected = np.stack([particle_project.image(s, i) for s in range(3) for i in range(20)])
    np.testing.assert_array_equal(source.read(np.arange(60)), expected)
    np.testing.assert_array_equal(source.read(np.arange(59, -1, -1)), expected[::-1])
    source.close()


def test_open_stacks_are_bounded(particle_project, monkeypatch):
    monkeypatch.setattr(stacks_images, "MAX_OPEN_STACKS", 2)
    star, expected = particle_project.standard()
    source = ImageSource(star, project_dir=particle_project.root)
    for start, images in source.batches(3):
        np.testing.assert_array_equal(images, expected[start : start + 3])
        assert len(source._open) <= 2
    source.close()
    assert not source._open


def test_paths_resolve_against_project_then_star_dir(particle_project, tmp_path, monkeypatch):
    # relative to the STAR file's directory when the project dir does not have them
    particle_project.add_stack("Select/job010/local.mrcs", 7, 3)
    star = particle_project.write_star("Select/job010/local.star", ["2@local.mrcs", "1@local.mrcs"])
    monkeypatch.chdir(tmp_path)
    source = ImageSource(star)
    assert source.stacks == [particle_project.root / "Select/job010/local.mrcs"]
    np.testing.assert_array_equal(source.read([0, 1]), np.stack([particle_project.image(7, i) for i in (1, 0)]))
    # the project dir wins when both have the file
    particle_project.add_stack("local.mrcs", 8, 3)
    source = ImageSource(star, project_dir=particle_project.root)
    assert source.stacks == [particle_project.root / "local.mrcs"]
    assert source.read([0])[0, 0, 0] == particle_project.image(8, 1)[0, 0]
    # absolute paths are used as they are
    absolute = particle_project.add_stack("elsewhere/abs.mrcs", 9, 2)
    star = particle_project.write_star("abs.star", [f"2@{absolute}"])
    np.testing.assert_array_equal(ImageSource(star).read([0])[0], particle_project.image(9, 1))


def _expect_input_error(star, project_dir, *needles):
    with pytest.raises(InputError) as err:
        ImageSource(star, project_dir=project_dir).read(np.arange(len(read_particles(star))))
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_stacks(particle_project):
    p, root = particle_project, particle_project.root
    p.add_stack("a.mrcs", 0, 10)
    p.add_stack("big.mrcs", 1, 2, box=24)
    p.add_stack("rect.mrcs", 2, 2, box=(16, 20))
    (root / "junk.mrcs").write_bytes(b"\x00" * 2000)
    full = (root / "a.mrcs").read_bytes()
    (root / "cut.mrcs").write_bytes(full[: len(full) - 100])
    (root / "head.mrcs").write_bytes(full[:500])  # not even a whole header
    _expect_input_error(p.write_star("s1.star", ["1@a.mrcs", "1@gone.mrcs"]), root,
                        "s1.star (row 2)", "gone.mrcs not found")
    _expect_input_error(p.write_star("s2.star", ["1@a.mrcs", "12@a.mrcs"]), root,
                        "s2.star (row 2)", "image 12 of", "a.mrcs", "holds 10")
    _expect_input_error(p.write_star("s3.star", ["1@a.mrcs", "1@big.mrcs"]), root,
                        "mixed box sizes", "a.mrcs is 16x16", "big.mrcs is 24x24")
    _expect_input_error(p.write_star("s4.star", ["1@rect.mrcs"]), root, "rect.mrcs", "not square")
    _expect_input_error(p.write_star("s5.star", ["1@junk.mrcs"]), root, "junk.mrcs", "not a readable MRC")
    _expect_input_error(p.write_star("s6.star", ["1@cut.mrcs"]), root, "cut.mrcs", "not a readable MRC")
    _expect_input_error(p.write_star("s8.star", ["1@head.mrcs"]), root, "head.mrcs", "not a readable MRC")
    _expect_input_error(p.write_star("s7.star", ["1@a.mrcs", "x@a.mrcs"]), root, "(row 2)", "bad image name")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile and numpy, writing the bad stack
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_name_stack_and_row(particle_project, bad):
    images = np.stack([particle_project.image(0, i) for i in range(4)])
    images[2, 5, 5] = bad
    path = particle_project.root / "bad.mrcs"
    with mrcfile.new(path, data=images) as mrc:
        mrc.set_image_stack()
    star = particle_project.write_star("bad.star", ["1@bad.mrcs", "2@bad.mrcs", "4@bad.mrcs", "3@bad.mrcs"])
    message = _expect_input_error(star, particle_project.root, f"{path} (row 4)", "image 3 has NaN")
    assert message.startswith(str(path))


def test_stack_writer_streams_chunks(tmp_path):
    images = np.random.default_rng(1).normal(size=(10, 16, 16)).astype(np.float32)
    path = tmp_path / "out" / "denoised.mrcs"
    with StackWriter(path, n=10, box=16, pixel_size=2.5) as writer:
        assert writer.tmp.exists() and not path.exists()
        assert not writer.tmp.name.endswith(".mrcs")  # a glob for *.mrcs never sees it
        for start in (6, 0, 3):  # chunks, any order
            writer.write(start, images[start : start + (4 if start == 6 else 3)])
    assert sorted(os.listdir(path.parent)) == ["denoised.mrcs"]
    with mrcfile.open(path, permissive=False) as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.voxel_size.x == pytest.approx(2.5) and mrc.header.mode == 2
        assert mrc.header.ispg == 0  # an image stack, as RELION writes them
        assert mrc.header.dmax == pytest.approx(images.max())
        assert mrc.header.dmean == pytest.approx(images.mean(), abs=1e-5)
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-4)


def test_stack_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "denoised.mrcs"
    with pytest.raises(RuntimeError):
        with StackWriter(path, n=10, box=16, pixel_size=1.0) as writer:
            writer.write(0, np.zeros((5, 16, 16)))
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="never written"):
        with StackWriter(path, n=10, box=16, pixel_size=1.0) as writer:
            writer.write(0, np.zeros((5, 16, 16)))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        with StackWriter(path, n=2, box=16, pixel_size=1.0) as writer:
            writer.write(1, np.zeros((2, 16, 16)))  # past the end
    assert os.listdir(tmp_path) == []


def test_write_stack_then_read_back_through_star(particle_project):
    images = np.stack([particle_project.image(3, i) for i in range(5)])
    write_stack(particle_project.root / "w.mrcs", images, pixel_size=1.5)
    star = particle_project.write_star("w.star", [f"{i}@w.mrcs" for i in (5, 1)])
    source = ImageSource(star, project_dir=particle_project.root)
    np.testing.assert_array_equal(source.read([0, 1]), images[[4, 0]])
    assert source.voxel_size == pytest.approx(1.5)


@pytest.mark.parametrize("name", ["map.mrc", "map.mrc.gz"])
def test_map_round_trip(tmp_path, name):
    volume = np.random.default_rng(2).normal(size=(12, 12, 12)).astype(np.float32)
    write_map(tmp_path / name, volume, 3.2)
    assert os.listdir(tmp_path) == [name]
    back, voxel = read_map(tmp_path / name)
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(3.2)


def test_bad_maps(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_map(tmp_path / "none.mrc")
    write_stack(tmp_path / "flat.mrc", np.zeros((1, 8, 8)), 1.0)
    with pytest.raises(InputError, match="3D map"):
        read_map(tmp_path / "flat.mrc")
    write_map(tmp_path / "box.mrc", np.zeros((8, 8, 6)), 1.0)
    with pytest.raises(InputError, match="not cubic"):
        read_map(tmp_path / "box.mrc")
    (tmp_path / "junk.mrc").write_bytes(b"junk" * 300)
    with pytest.raises(InputError, match="junk.mrc"):
        read_map(tmp_path / "junk.mrc")


def test_one_source_for_a_star_file_a_table_or_a_bare_stack(particle_project):
    """ImageSource takes a STAR file, a particle table or an MRC stack; pixel size and CTF values
    come with it; ``[rows]`` applies a transform, ``read`` gives the images as stored."""
    star, expected = particle_project.standard()
    root = particle_project.root
    with ImageSource(star, project_dir=root) as a, ImageSource(read_particles(star), project_dir=root) as b:
        np.testing.assert_array_equal(a[:], b.read(np.arange(b.n)))
        np.testing.assert_array_equal(a[3], expected[[3]])
        assert a.shape == (len(expected), 16, 16) and a.pixel_size == pytest.approx(1.77)
        ctf = a.ctf_values()
        assert list(ctf.columns)[:3] == ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"] and len(ctf) == len(expected)
        assert a.ctf is None  # no transform: nothing phase-flipped
    write_stack(root / "bare.mrcs", expected[:5], 2.5)
    with ImageSource(root / "bare.mrcs") as bare:  # every section a particle, at the header's pixel size
        assert len(bare) == 5 and bare.pixel_size == pytest.approx(2.5) and bare.ctf_values() is None
        np.testing.assert_array_equal(bare[[4, 0]], expected[[4, 0]])

    class Binned:
        box = 8

        def __call__(self, images, rows):
            return images[:, ::2, ::2]

    with ImageSource(star, project_dir=root, transform=Binned()) as binned:
        assert binned.shape == (len(expected), 8, 8) and binned.box == 16
        np.testing.assert_array_equal(binned[[1, 2]], expected[[1, 2]][:, ::2, ::2])
        assert binned.read([1]).shape == (1, 16, 16)


@pytest.mark.parametrize("fault", ["map_id", "machine_stamp", "both"])
def test_headers_relion_reads_are_read_with_one_warning(particle_project, fault, caplog):
    """Stacks without the 'MAP ' ID or a machine stamp (several tools write them; RELION reads them)
    are read, with one warning naming the file; other damage is still refused."""
    import logging

    p, root = particle_project, particle_project.root
    p.add_stack("a.mrcs", 0, 4)
    data = bytearray((root / "a.mrcs").read_bytes())
    if fault in ("map_id", "both"):
        data[208:212] = b"\0\0\0\0"
    if fault in ("machine_stamp", "both"):
        data[212:216] = b"\0\0\0\0"
    (root / "b.mrcs").write_bytes(bytes(data))
    star = p.write_star("b.star", ["1@b.mrcs", "3@b.mrcs", "2@b.mrcs"])
    with caplog.at_level(logging.WARNING, logger="cdae_em"):
        with ImageSource(star, project_dir=root) as source:
            np.testing.assert_array_equal(source.read([0, 1, 2]), [p.image(0, 0), p.image(0, 2), p.image(0, 1)])
        with ImageSource(star, project_dir=root) as again:
            again.read([0])
    warnings = [r for r in caplog.records if "b.mrcs" in r.getMessage()]
    assert len(warnings) == 1 and "as RELION does" in warnings[0].getMessage(), [r.getMessage() for r in caplog.records]
    (root / "c.mrcs").write_bytes(bytes(data[: len(data) - 100]))  # and truncated: refused
    _expect_input_error(p.write_star("c.star", ["1@c.mrcs"]), root, "c.mrcs", "not a readable MRC")
