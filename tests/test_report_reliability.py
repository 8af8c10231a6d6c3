"""Every NLL vaelab reports carries its reliability: k-hat and ESS per example from
``log_likelihood`` (equal to computing them on all weights at once), the report's summary
and one-line warning, and AIS / BDMC from the report and the command line."""

from __future__ import annotations

import math

import pytest
import torch

from ppca import PPCA
from test_estimators import data, gen, importance_log_weights
from vaelab import evaluate, metrics, objectives
from vaelab.psis import effective_sample_size, pareto_k


@pytest.mark.parametrize("width, chunk", [(1.0, None), (1.2, 300), (0.25, 7)])
def test_log_likelihood_reports_k_hat_and_ess_of_its_own_weights(width, chunk):
    model, x, num = PPCA(width=width), data(4), 2000
    result = objectives.log_likelihood(model, x, num_samples=num, chunk_size=chunk,
                                       generator=gen(3))
    weights = importance_log_weights(model, x, num, seed=3)  # the same draws, all at once
    torch.testing.assert_close(result.per_example, torch.logsumexp(weights.double(), 0)
                               - math.log(num), rtol=1e-12, atol=1e-10)
    if width == 1.0:  # the exact posterior: constant weights
        assert torch.isneginf(result.pareto_k).all()
        torch.testing.assert_close(result.ess, torch.full((4,), float(num), dtype=torch.float64))
    else:
        torch.testing.assert_close(result.pareto_k, pareto_k(weights), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(result.ess, effective_sample_size(weights), rtol=1e-9,
                                   atol=1e-9)
        assert (result.pareto_k > 0.7).all() == (width < 1)


def test_pareto_summary_and_the_warning_threshold():
    k = torch.tensor([0.2, 0.4, float("-inf"), float("nan"), 0.9, float("inf")],
                     dtype=torch.float64)
    summary = metrics.pareto_k_summary(k, 5000)
    assert summary["threshold"] == 0.7 and summary["not_estimated"] == 1
    assert summary["fraction_above"] == pytest.approx(2 / 5)  # 0.9 and inf of 5 estimated
    assert summary["max"] == float("inf") and summary["warn"] is True
    assert metrics.pareto_k_summary(torch.tensor([0.1] * 200 + [0.8]), 100)["warn"] is False
    # K = 100: the threshold is min(1 - 1/log10 K, 0.7) = 0.5
    assert metrics.pareto_k_summary(torch.tensor([0.6]), 100)["threshold"] == pytest.approx(0.5)


def test_report_warns_in_one_line_when_the_weights_are_heavy_tailed():
    narrow, x = PPCA(width=0.25), data(40)
    report = evaluate.evaluate(narrow, x, iw_samples=2000, batch_size=20)
    share = report["pareto_k"]["fraction_above"]
    assert share > 0.8 and report["ess_median"] < 200
    (warning,) = report["warnings"]
    assert warning.startswith(f"{100 * share:.1f}% of the examples have a Pareto k-hat above "
                              "0.70 (max ")
    assert "--iw-samples" in warning and "--estimator ais" in warning and "\n" not in warning
    table = evaluate.format_table(report)
    assert table.splitlines()[-1] == f"warning: {warning}"
    assert "Pareto k-hat" in table
    exact = evaluate.evaluate(PPCA(width=1.0), x, iw_samples=300, batch_size=20)
    assert exact["warnings"] == [] and exact["pareto_k"]["max"] == float("-inf")


def test_ais_and_bdmc_in_the_report_track_the_closed_form():
    model, x = PPCA(width=0.5, shift=0.3), data(30)
    truth = float(model.log_px(x).mean())
    torch.set_num_threads(1)
    report = evaluate.evaluate(model, x, batch_size=10, estimator="ais", steps=30,
                               chains=30)
    est = report["estimator"]
    assert (est["name"], est["steps"], est["chains"], est["leapfrog_steps"]) == ("ais", 30, 30, 10)
    assert 0.3 < est["mean_acceptance"] < 1.0
    # -log p(x) by AIS within 4 standard errors (Monte Carlo) of the closed form
    assert abs(-report["nll"] - truth) < 4 * report["nll_mc_stderr"] + 1e-3
    bdmc = metrics.bdmc_metrics(model, 20, steps=30, chains=8, batch_size=10)
    assert bdmc["upper"] >= bdmc["lower"] - 3 * bdmc["gap_stderr"]
    assert bdmc["gap"] < 0.5
