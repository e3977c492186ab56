"""Pre-training: the simulated training pairs and the block-by-block training on them."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import run_cli

from cdae_em.simulate.pretrain_data import PairSampler, PairSettings, ProjectionBank, load_structures
from cdae_em.denoise.train import PretrainSettings, pretrain
from cdae_em.denoise.weights import load_weights

SMALL = PairSettings(box=32, views_per_structure=40, seed=1, background_fraction=0.0)


@pytest.fixture(scope="module")
def bank():
    structures = load_structures()
    return ProjectionBank({k: structures[k] for k in ("1A8O", "1GBT")}, SMALL)


def sampler(bank, **changes) -> PairSampler:
    return PairSampler(bank, dataclasses.replace(SMALL, **changes))


def test_shipped_structures_hold_none_of_the_benchmark_proteins():
    names = set(load_structures())
    assert len(names) >= 10
    assert not names & {"1BHL", "2XHE", "4ZHL"}


def test_pairs_have_the_asked_snr_and_unit_clean_variance(bank):
    noisy, clean = sampler(bank, snr=(0.1, 0.1)).sample(64, np.random.default_rng(0))
    assert noisy.shape == clean.shape == (64, 32, 32)
    assert torch.allclose(clean.var(dim=(1, 2)), torch.ones(64), atol=0.05)
    noise_var = float((noisy - clean).var())
    assert 9.0 < noise_var < 11.0  # SNR 0.1: noise variance 10


def _lag1(x: torch.Tensor) -> float:
    x = x - x.mean(dim=(1, 2), keepdim=True)
    return float((x[:, :, 1:] * x[:, :, :-1]).mean() / (x**2).mean())


def test_real_conditions_colour_the_noise_and_damp_the_signal(bank):
    rng = np.random.default_rng(4)
    noisy, clean = sampler(bank, white_fraction=1.0, snr=(0.1, 0.1)).sample(64, rng)
    assert abs(_lag1(noisy - clean)) < 0.03  # white: neighbouring pixels independent
    noisy, clean = sampler(bank, white_fraction=0.0, snr=(0.1, 0.1)).sample(64, rng)
    assert _lag1(noisy - clean) > 0.05  # coloured: neighbours correlated, like a real detector's
    assert 9.0 < float((noisy - clean).var()) < 11.0  # still SNR 0.1
    plain = dict(ctf_fraction=0.0, max_blur=0.0, max_shift=0.0)

    def high_share(bfactor):
        _, c = sampler(bank, bfactor=(bfactor, bfactor), **plain).sample(32, np.random.default_rng(6))
        power = torch.fft.rfft2(c).abs() ** 2
        return float(power[:, 8:, 8:17].sum() / power.sum())

    assert high_share(300.0) < 0.5 * high_share(0.0)


def test_backgrounds_put_ice_and_carbon_in_the_clean_image(bank):
    plain = dict(ctf_fraction=0.0, max_blur=0.0, max_shift=0.0, snr=(0.1, 0.1))
    _, without = sampler(bank, **plain).sample(32, np.random.default_rng(8))
    _, with_bg = sampler(bank, background_fraction=1.0, carbon_fraction=1.0, **plain).sample(32, np.random.default_rng(8))
    edge = lambda x: x[:, :, :4].mean(dim=(1, 2)) - x[:, :, -4:].mean(dim=(1, 2))  # noqa: E731
    assert float(edge(with_bg).abs().mean()) > 3 * float(edge(without).abs().mean())


def _centre_minus_edge(clean: torch.Tensor) -> torch.Tensor:
    box = clean.shape[-1]
    c = torch.arange(box) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    return clean[:, r < box * 0.15].mean(1) - clean[:, r > box * 0.45].mean(1)


def test_dark_fraction_sets_the_protein_contrast(bank):
    plain = dict(ctf_fraction=0.0, max_blur=0.0, max_shift=0.0)
    _, bright = sampler(bank, dark_fraction=0.0, **plain).sample(32, np.random.default_rng(1))
    _, dark = sampler(bank, dark_fraction=1.0, **plain).sample(32, np.random.default_rng(1))
    assert (_centre_minus_edge(bright) > 0).all()
    assert torch.allclose(dark, -bright, atol=1e-5)


def test_fill_sets_the_particle_size(bank):
    plain = dict(ctf_fraction=0.0, max_blur=0.0, max_shift=0.0)

    def spread(fill):
        _, clean = sampler(bank, fill=(fill, fill), **plain).sample(32, np.random.default_rng(2))
        x = clean - clean[:, :2, :].mean(dim=(1, 2), keepdim=True)  # background ~0
        box = x.shape[-1]
        c = torch.arange(box, dtype=torch.float32) - box // 2
        r2 = c[:, None] ** 2 + c[None, :] ** 2
        w = x.abs()
        return float(((w * r2).sum(dim=(1, 2)) / w.sum(dim=(1, 2))).sqrt().mean())

    small, large = spread(0.4), spread(0.9)
    assert 1.6 < large / small < 2.8  # radius of gyration scales with the fill (0.9 / 0.4 = 2.25)


def test_validation_pairs_come_from_held_out_views(bank):
    s = sampler(bank)
    n_views = len(bank.images[0])
    assert 0 < bank.n_val < n_views
    a, _ = s.sample(8, np.random.default_rng(5), validation=True)
    b, _ = s.sample(8, np.random.default_rng(5), validation=True)
    assert torch.equal(a, b)  # seeded


def test_each_block_learns_on_the_previous_blocks_output(bank, tmp_path):
    settings = PretrainSettings(steps=(60, 30, 30), batch_size=16, lr=2e-3, val_pairs=64, eval_every=30, seed=1)
    model, history = pretrain(sampler(bank, snr=(0.05, 0.5)), tmp_path, settings, torch.device("cpu"),
                              channels=(8, 16, 16), dropout=0.1, metadata={"command": "test"})
    assert [h["input"] for h in history] == ["noisy", "block 1 output", "block 2 output"]
    first = history[0]["evaluations"]
    # block 1 learns to denoise: the validation loss falls and the PSNR gain rises (measured here:
    # loss about -40%, gain from about -3 dB to above +3 dB in 60 steps)
    assert first[-1]["val_loss"] < 0.8 * first[0]["val_loss"], first
    assert first[-1]["val_psnr_gain_db"] > first[0]["val_psnr_gain_db"] + 2.0, first
    loaded, meta = load_weights(tmp_path / "cdae_weights.pt")
    assert meta["command"] == "test" and meta["pretrain"]["seed"] == 1 and len(meta["history"]) == 3
    x = torch.randn(4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=2e-2)  # float16 storage
    # resumable: a rerun finds every block finished and gives the same weights
    again, _ = pretrain(sampler(bank, snr=(0.05, 0.5)), tmp_path, settings, torch.device("cpu"),
                        channels=(8, 16, 16), dropout=0.1, metadata={"command": "test"})
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float().cpu(), atol=1e-2)


def test_pretrain_command_writes_weights_denoise_can_use(tmp_path):
    from benchmarks.datasets import DATA

    r = run_cli("pretrain", "--o", tmp_path / "w", "--map", DATA / "1BHL.pdb.gz", "--box", 32, "--views", 12,
                "--steps", "2,1,1", "--channels", "8,16,16", "--batch-size", 4, "--seed", 3)
    assert r.returncode == 0, r.stderr
    _, meta = load_weights(tmp_path / "w" / "cdae_weights.pt")
    assert "--steps 2,1,1" in meta["command"] and meta["seed"] == 3
    bad = run_cli("pretrain", "--o", tmp_path / "w2", "--channels", "32,64")
    assert bad.returncode != 0 and "--channels" in bad.stderr and "Traceback" not in bad.stderr
    for args, name in ((["--white-fraction", "1.5"], "--white-fraction"), (["--bfactor", "100", "50"], "--bfactor")):
        bad = run_cli("pretrain", "--o", tmp_path / "w3", *args)
        assert bad.returncode != 0 and name in bad.stderr and "Traceback" not in bad.stderr
        assert not (tmp_path / "w3" / "cdae_weights.pt").exists()
