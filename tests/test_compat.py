"""Keras loss semantics: the documented case, hand-computed values, clipping, axes."""

from __future__ import annotations

import math

import pytest
import torch

from vaelab.compat import EPSILON, FLAVORS, keras_binary_crossentropy, keras_mse
from vaelab.errors import ConfigError

Y_TRUE = [1.0, 1.0, 0.0]
Y_PRED = [0.2393, 0.7484, -1.1399]


def bce(t, p, flavor, dtype=torch.float64, from_logits=False, axis=-1):
    return keras_binary_crossentropy(
        torch.tensor(t, dtype=dtype), torch.tensor(p, dtype=dtype),
        from_logits=from_logits, axis=axis, flavor=flavor,
    )


def test_documented_case_is_reproduced_from_probabilities():
    # 0.57328504 is the float32 value of the Keras 3 formula with from_logits=False:
    # -1.1399 is clipped to 1e-7, so the third term is -log(1 - 1e-7) ~ 1e-7
    value = bce(Y_TRUE, Y_PRED, "keras3", dtype=torch.float32)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(0.57328504, abs=1e-6)
    by_hand = -(math.log(0.2393) + math.log(0.7484) + math.log(1 - EPSILON)) / 3
    assert float(bce(Y_TRUE, Y_PRED, "keras3")) == pytest.approx(by_hand, rel=1e-12)
    # tf.keras adds eps inside the log: 2.2e-7 lower, still 0.57328504 to 1e-6
    tf_keras = -(math.log(0.2393 + EPSILON) + math.log(0.7484 + EPSILON) + math.log(1.0)) / 3
    assert float(bce(Y_TRUE, Y_PRED, "tf_keras")) == pytest.approx(tf_keras, rel=1e-12)
    assert float(bce(Y_TRUE, Y_PRED, "tf_keras", torch.float32)) == pytest.approx(
        0.57328504, abs=1e-6)


def test_documented_case_with_from_logits_is_a_different_number():
    # with from_logits=True the same inputs give 0.41518056, not 0.57328504
    by_hand = (math.log1p(math.exp(-0.2393)) + math.log1p(math.exp(-0.7484))
               + math.log1p(math.exp(-1.1399)) + 0.0) / 3
    for flavor in FLAVORS:
        value = bce(Y_TRUE, Y_PRED, flavor, from_logits=True)
        assert float(value) == pytest.approx(by_hand, rel=1e-12)
        assert float(value) == pytest.approx(0.41518056, abs=1e-7)


@pytest.mark.parametrize(
    "t, p, flavor, expected",
    [
        # clipping at 0 and 1 (eps = 1e-7)
        (1.0, 0.0, "keras3", -math.log(1e-7)),  # 16.1181
        (1.0, 0.0, "tf_keras", -math.log(2e-7)),  # 15.4249: eps added after the clip
        (1.0, 0.0, "keras_legacy", -math.log(1e-7)),
        (0.0, 1.0, "keras3", -math.log(1 - (1 - 1e-7))),
        (0.0, 1.0, "tf_keras", -math.log(1 - (1 - 1e-7) + 1e-7)),
        (1.0, 1.0, "keras3", -math.log(1 - 1e-7)),  # 1.0000000494e-07, never exactly 0
        (1.0, 1.0, "tf_keras", -math.log(1 - 1e-7 + 1e-7)),
        (1.0, 1.7, "keras3", -math.log(1 - 1e-7)),  # out-of-range outputs are clipped too
        (0.0, -3.0, "keras3", -math.log(1 - 1e-7)),
        # soft targets in the interior
        (0.3, 0.6, "keras3", -(0.3 * math.log(0.6) + 0.7 * math.log(0.4))),  # 0.79465
        (0.3, 0.6, "tf_keras", -(0.3 * math.log(0.6 + 1e-7) + 0.7 * math.log(0.4 + 1e-7))),
        (0.3, 0.6, "keras_legacy", -(0.3 * math.log(0.6) + 0.7 * math.log(0.4))),
    ],
)
def test_hand_computed_elementwise_values(t, p, flavor, expected):
    assert float(bce([t], [p], flavor)) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_tf_docs_example_row_means():
    # tf.keras.losses.binary_crossentropy docs: [[0, 1], [0, 0]] vs [[.6, .4], [.4, .6]]
    value = bce([[0.0, 1.0], [0.0, 0.0]], [[0.6, 0.4], [0.4, 0.6]], "tf_keras", torch.float32)
    assert value.shape == (2,)
    torch.testing.assert_close(value, torch.tensor([0.916, 0.714]), rtol=0, atol=6e-4)
    expected = [-math.log(0.4), -(math.log(0.6) + math.log(0.4)) / 2]
    torch.testing.assert_close(value, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_from_logits_is_stable_for_large_logits():
    value = bce([[0.0, 1.0, 1.0, 0.0]], [[100.0, -100.0, 100.0, -100.0]], "keras3",
                from_logits=True, axis=0)
    torch.testing.assert_close(value, torch.tensor([100.0, 100.0, 0.0, 0.0],
                                                   dtype=torch.float64), rtol=0, atol=1e-40)
    logits = torch.linspace(-30, 30, 61, dtype=torch.float64)
    target = torch.rand(61, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="mean")
    torch.testing.assert_close(keras_binary_crossentropy(target, logits, from_logits=True), ref)


def test_mean_is_over_the_given_axis():
    g = torch.Generator().manual_seed(1)
    t = (torch.rand(2, 3, 4, generator=g) > 0.5).double()
    p = torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    elementwise = -(t * p.log() + (1 - t) * (1 - p).log())
    for axis in [-1, 0, 1]:
        torch.testing.assert_close(keras_binary_crossentropy(t, p, axis=axis),
                                   elementwise.mean(axis))
    assert keras_binary_crossentropy(t, p).shape == (2, 3)


def test_keras_mse_by_hand():
    value = keras_mse(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]),
                      torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 2.0]]))
    torch.testing.assert_close(value, torch.tensor([5 / 3, 1.25 / 3]))
    value = keras_mse([[0.0, 2.0], [4.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], axis=0)
    torch.testing.assert_close(value, torch.tensor([17 / 2, 2.0]))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown Keras flavor 'keras4'"):
        keras_binary_crossentropy([1.0], [0.5], flavor="keras4")
    with pytest.raises(ConfigError, match=r"y_true has shape \(2,\) but y_pred has shape \(3,\)"):
        keras_mse([1.0, 0.0], [0.5, 0.5, 0.5])
