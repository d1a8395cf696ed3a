"""The truth's noise floor and the evaluate verdict, on hand-made numbers."""

import math

import numpy as np
import pytest

from lightning_influence.evaluation.verdict import truth_noise_floor, verdict


def test_noise_floor_is_relative_error_times_query_change():
    assert truth_noise_floor(0.5, 0.3, drift=1e-3, eps=1e-7, t2=100) == pytest.approx(1e-3 * 0.2)
    assert truth_noise_floor(0.5, 0.3, drift=0.0, eps=1e-7, t2=100) == pytest.approx(1e-7 * 10 * 0.2)
    assert truth_noise_floor(0.5, 0.5, drift=1e-3, eps=1e-7, t2=100) == 0.0


def test_verdict_names_the_best_method_and_the_disagreement():
    metrics = {"dit": {"spearman": 0.8, "flipped_auroc": 0.75}, "tracin": {"spearman": -0.3, "flipped_auroc": 0.99}}
    line = verdict(metrics, np.array([1.0, -2.0, 3.0]), floor=0.1)
    assert line.startswith("dit agrees best with leave-one-out (Spearman 0.80; tracin -0.30)")
    assert "but tracin detects flipped labels best (AUROC 0.99)" in line


def test_verdict_when_the_truth_is_noise_or_absent():
    metrics = {"dit": {"spearman": 0.9}}
    line = verdict(metrics, np.array([1e-9, -2e-9, 1.0]), floor=1e-6)
    assert "within its noise floor (1.00e-06) for 2 of 3 samples" in line and "cannot rank" in line
    assert verdict({"dit": {"spearman": 0.1}}, np.ones(4), 0.0).startswith("no method agrees")
    assert verdict({"x": {"flipped_auroc": 0.7}}, None, None) == "no ground truth; x detects flipped labels best (AUROC 0.70)"
    assert math.isfinite(truth_noise_floor(1, 2, 0, 0, 0))


def test_demo_last_epoch_sentence_is_measured():
    from types import SimpleNamespace

    from lightning_influence.examples.digits import last_epoch_note

    flipped = np.array([True, True, False, False])
    patterns = SimpleNamespace(noise=np.array([1e-3, 5e-4, 3e-5]),
                               significant=np.array([[1, 1, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=bool))
    const = SimpleNamespace(lr=lambda t: np.array([0.1]))
    line = last_epoch_note(const, patterns, flipped, last_start=20)
    assert line.startswith("why: ") and "3% of epoch 0's;" in line and "annealed" not in line
    assert "only 1 of 2 flipped samples (2 samples in all)" in line
    annealed = SimpleNamespace(lr=lambda t: np.array([0.1 if t < 10 else 0.025]))
    assert "learning rate has annealed to 25% of epoch 0's" in last_epoch_note(annealed, patterns, flipped, 20)


def test_verdict_calls_no_method_a_detector_at_chance():
    """'tracin detects flipped labels best (AUROC 0.50)' was said of a chance-level ranking: below DETECTS_AUROC the
    verdict names no detector."""
    metrics = {"dit": {"spearman": 0.9, "flipped_auroc": 0.48}, "tracin": {"spearman": 0.2, "flipped_auroc": 0.50}}
    assert verdict(metrics, np.array([1.0, -2.0, 3.0]), floor=0.0) == \
        "dit agrees best with leave-one-out (Spearman 0.90; tracin 0.20)"
    assert verdict({"x": {"flipped_auroc": 0.55}}, None, None) == \
        "no ground truth; no method detects flipped labels (best AUROC 0.55)"
