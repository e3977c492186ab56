"""The cascade model, pre-training, weights files."""

import os
import pickle

import mrcfile
import numpy as np
import pytest
import torch

from cdae_em.denoise.cascade import Cascade, DAEBlock
from cdae_em.errors import InputError
from cdae_em.core.metrics import psnr
from cdae_em.simulate.simulator import SimulationSettings, load_source, simulate
from cdae_em.denoise.weights import default_weights_path, load_weights, save_weights

SMALL = (8, 16, 16)  # small channel counts keep CPU tests fast; the shape of the model is the paper's


@pytest.mark.parametrize("box", [32, 40, 64, 36])
def test_block_keeps_any_box(box):
    block = DAEBlock(SMALL).eval()
    x = torch.randn(2, box, box)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_block_architecture_matches_the_paper():
    block = DAEBlock()
    convs = [m for m in block.encoder if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in block.encoder if isinstance(m, torch.nn.MaxPool2d)]
    deconvs = [m for m in block.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    last = block.decoder[-1]
    assert len(convs) == 6 and len(pools) == 3 and len(deconvs) == 3
    assert isinstance(last, torch.nn.Conv2d) and last.in_channels == 32 and last.out_channels == 1
    drops = [m.p for m in list(block.encoder) + list(block.decoder) if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.5 for p in drops)


def blob_protein(path):
    """A held-out 'protein' the weights never saw: 30 Gaussian blobs in a 64^3 box at 4.2 A/px."""
    rng = np.random.default_rng(7)
    c = np.arange(64) - 32
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((64, 64, 64), np.float32)
    for centre in rng.uniform(-14, 14, (30, 3)):
        vol += np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * 2.5**2))
    with mrcfile.new(path) as m:
        m.set_data(vol)
        m.voxel_size = 4.2
    return path


def test_shipped_cascade_raises_psnr_on_a_held_out_protein(tmp_path):
    """The weights that ship with cdae-em (pre-trained on the embedded map, 4.2 A/px) on a protein
    they never saw, without fine-tuning."""
    model, _ = load_weights(default_weights_path())
    model.eval()
    source = load_source(blob_protein(tmp_path / "blobs.mrc"))
    sim = SimulationSettings(n_particles=100, in_plane=True, max_shift=1.0, ctf=True, snrs=[0.1], seed=9)
    simulate(source, sim, tmp_path / "sim")
    noisy = mrcfile.read(tmp_path / "sim" / "particles.mrcs")
    clean = mrcfile.read(tmp_path / "sim" / "clean.mrcs")
    with torch.no_grad():
        denoised = model(torch.from_numpy(noisy)).numpy()
    gain = psnr(denoised, clean).mean() - psnr(noisy, clean).mean()
    # measured with the 0.2 weights: see docs/denoiser.md (the 0.1 weights: +4.6 dB)
    assert gain > 3.0, gain


def test_weights_round_trip(tmp_path):
    model = Cascade(channels=SMALL, dropout=0.2)
    save_weights(model, tmp_path / "w.pt", {"command": "test"})
    loaded, meta = load_weights(tmp_path / "w.pt")
    assert meta == {"command": "test"} and loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_weights",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "cdae-em-weights", "payload": _Exploit()}, path)
    with pytest.raises(InputError, match="evil.pt"):
        load_weights(path)
    assert not (tmp_path / "pwned_by_weights").exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputError, match="not a cdae-em weights file"):
        load_weights(tmp_path / "plain.pkl")


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    model = Cascade(channels=SMALL)
    state = model.state_dict()
    state["blocks.0.encoder.0.weight"] = torch.zeros(3, 3)
    torch.save({"format": "cdae-em-weights", "version": 1, "config": model.config, "state_dict": state,
                "metadata": "{}"}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt.*do not fit"):
        load_weights(tmp_path / "bad.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    """The production inference path (denoise.run_block: bfloat16 autocast on CUDA) against float32
    on the CPU, block by block, with the shipped weights."""
    from cdae_em.denoise.inference import run_block
    from cdae_em.denoise.train import autocast

    mixed = autocast(torch.device("cuda"))
    assert mixed.fast_dtype == torch.bfloat16 and mixed._enabled  # what production runs
    model, _ = load_weights(default_weights_path())
    x = torch.randn(64, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    for j, block in enumerate(model.blocks, start=1):
        cpu, gpu = np.zeros_like(x), np.zeros_like(x)
        run_block(block, x, cpu, torch.device("cpu"), 16, "cpu")
        run_block(block, x, gpu, torch.device("cuda"), 16, "cuda")
        error = np.abs(gpu - cpu).max() / np.abs(cpu).max()
        corr = np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1]
        assert error < 0.05 and corr > 0.999, (j, error, corr)  # bfloat16: ~3 significant digits
        assert not np.array_equal(gpu, cpu)  # bfloat16 really ran
        x = cpu
