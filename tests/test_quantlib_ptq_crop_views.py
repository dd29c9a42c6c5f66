"""``crop_views``: the layer-wise caches add random resized crops of every calibration image."""

from __future__ import annotations

import pytest
import torch

from quantlib.ptq.adaround import apply_adaround
from quantlib.ptq.layer_cache import CacheConfig, collect_samples
from quantlib.ptq.pass_config import PassConfigError
from quantlib_reconstruction_helpers import FAST, calibrated_sim
from test_quantlib_ptq_qdrop_and_blocks import residual_net


def _images(count: int = 10) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_views_follow_the_originals_are_reproducible_and_leave_the_global_rng_alone():
    x = _images()
    state = torch.random.get_rng_state()
    chunks = collect_samples([x], CacheConfig(num_samples=10, batch_size=4, crop_views=2, seed=3), torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    cached = torch.cat(chunks)
    assert cached.shape == (30, 3, 16, 16) and [c.shape[0] for c in chunks] == [4, 4, 4, 4, 4, 4, 4, 2]
    assert torch.equal(cached[:10], x)
    views = cached[10:]
    assert not any(torch.allclose(view, image) for view, image in zip(views, torch.cat([x, x])))
    again = torch.cat(collect_samples([x], CacheConfig(num_samples=10, batch_size=4, crop_views=2, seed=3), torch.device("cpu")))
    other = torch.cat(collect_samples([x], CacheConfig(num_samples=10, batch_size=4, crop_views=2, seed=4), torch.device("cpu")))
    assert torch.equal(again, cached) and not torch.equal(other, cached)


def test_mirror_and_views_are_both_added_after_the_originals():
    x = _images(4)
    cached = torch.cat(collect_samples([x], CacheConfig(num_samples=4, batch_size=4, mirror=True, crop_views=1),
                                       torch.device("cpu")))
    assert cached.shape[0] == 12 and torch.equal(cached[4:8], x.flip(-1))


def test_adaround_caches_the_views():
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sim = calibrated_sim(residual_net(), x, weight_bits=4, activation_bits=8)
    result = apply_adaround(sim, [x], {**FAST, "num_iterations": 5, "num_samples": 64, "batch_size": 32,
                                       "crop": None, "crop_views": 2}, progress=False)
    assert result.stats.num_samples == 192


def test_bad_settings_are_named():
    with pytest.raises(PassConfigError, match="crop_views"):
        CacheConfig(crop_views=-1)
    with pytest.raises(PassConfigError, match="crop_views=2 would hold out crops of samples that are fitted on"):
        apply_adaround(None, [], {"crop_views": 2, "holdout_chunks": 1})
    with pytest.raises(PassConfigError, match=r"crop_views needs image inputs shaped \(N, C, H, W\); the data gave shape \(8, 24\)"):
        collect_samples([torch.zeros(8, 24)], CacheConfig(num_samples=8, crop_views=1), torch.device("cpu"))
