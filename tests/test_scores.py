"""Proper scores of predictive distributions, and the generative head's joint draws."""

from __future__ import annotations

import numpy as np
import torch

from perceiver.config import HeadConfig
from perceiver.heads import FlowMatchingHead, GaussianHead
from pipelines.run.scores import crps_gaussian, crps_samples, energy_score, sample_coverage


def test_sample_crps_converges_to_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    value = rng.normal(0, 2, 2000)
    mean, sd = rng.normal(0, 1, 2000), rng.uniform(0.5, 3, 2000)
    draws = mean + sd * rng.standard_normal((400, 2000))
    exact = crps_gaussian(value, mean, sd)
    assert (exact > 0).all()
    assert abs(crps_samples(value, draws).mean() - exact.mean()) < 0.01 * exact.mean() + 0.01
    # a point forecast's CRPS is its absolute error
    np.testing.assert_allclose(crps_samples(value, np.repeat(mean[None], 3, 0)), np.abs(value - mean))


def test_energy_score_of_one_element_is_its_crps_and_it_rewards_joint_draws():
    rng = np.random.default_rng(1)
    value, draws = rng.normal(size=50), rng.normal(size=(16, 50))
    np.testing.assert_allclose(energy_score(value, draws, np.arange(50), 50), crps_samples(value, draws))
    # records of 8 elements sharing one offset: draws that share it beat independent draws, same marginals
    n_rec, n = 300, 8
    record = np.repeat(np.arange(n_rec), n)
    value = np.repeat(rng.normal(size=n_rec), n) + 0.1 * rng.normal(size=n_rec * n)
    joint = np.repeat(rng.normal(size=(16, n_rec)), n, axis=1) + 0.1 * rng.normal(size=(16, n_rec * n))
    independent = np.sqrt(1.01) * rng.normal(size=(16, n_rec * n))
    es_joint, es_indep = (energy_score(value, d, record, n_rec).mean() for d in (joint, independent))
    assert es_joint < 0.95 * es_indep  # (about 0.90x here)
    assert np.isnan(energy_score(value, joint, record, n_rec + 1)[-1])  # a record without elements


def test_sample_coverage_of_calibrated_draws():
    rng = np.random.default_rng(2)
    value, draws = rng.normal(size=20_000), rng.normal(size=(200, 20_000))
    for level in (0.5, 0.9):
        assert abs(sample_coverage(value, draws, level).mean() - level) < 0.02


def test_the_diffusion_head_draws_a_record_jointly():
    """Records of 6 queries whose values share one random offset (nothing in the query states says which):
    the diffusion head's draws move together within a record as the data do (correlation near 1), the
    Gaussian head's are independent, and the joint draws have the better energy score."""
    torch.manual_seed(0)
    config = HeadConfig(name="diffusion", options={"width": 32, "sample_steps": 4})
    head = FlowMatchingHead(config, d_query=8)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    n_rec, n = 64, 6
    offsets = torch.arange(0, (n_rec + 1) * n, n)

    def batch() -> torch.Tensor:
        return (torch.randn(n_rec).repeat_interleave(n) + 0.1 * torch.randn(n_rec * n))

    h, error = torch.zeros(n_rec * n, 8), torch.full((n_rec * n,), float("nan"))
    for _ in range(400):
        loss = head.loss(head(h), batch(), error, offsets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = head(h)
        gen = torch.Generator().manual_seed(1)
        joint = head.sample(out, offsets, 32, generator=gen).numpy()
        independent = GaussianHead.sample(head, out, offsets, 32, generator=gen).numpy()
        np.testing.assert_array_equal(head.sample(out, offsets, 2, generator=torch.Generator().manual_seed(3)),
                                      head.sample(out, offsets, 2, generator=torch.Generator().manual_seed(3)))
    assert joint.shape == (32, n_rec * n)

    def within_record_correlation(d: np.ndarray) -> float:
        x = d.reshape(32, n_rec, n)
        return float(np.corrcoef(x[..., 0].ravel(), x[..., 1].ravel())[0, 1])

    assert within_record_correlation(joint) > 0.7
    assert abs(within_record_correlation(independent)) < 0.2
    # (perfectly joint draws of this data score 0.90x independent ones with 6 elements per record)
    value, record = batch().numpy(), np.repeat(np.arange(n_rec), n)
    assert energy_score(value, joint, record, n_rec).mean() < 0.95 * energy_score(value, independent, record,
                                                                                  n_rec).mean()
