"""The shared logit-agreement metrics against values worked out by hand."""
import numpy as np
import pytest

from skywork_deploy.base.agreement import log_softmax, logit_agreement


def test_identical_logits_agree_fully():
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=np.float32)
    m = logit_agreement(x, x)
    assert m == {"max_abs_diff": 0.0, "cosine_mean": pytest.approx(1.0), "cosine_min": pytest.approx(1.0),
                 "top1_agreement": 1.0, "kl_mean": pytest.approx(0.0, abs=1e-15), "positions": 2}


def test_hand_computed_values():
    ref = np.array([[0.0, 0.0], [1.0, 0.0]])
    ours = np.array([[0.0, np.log(3.0)], [0.0, 1.0]])
    m = logit_agreement(ours, ref)
    # row 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3); cosine 0 (ref is the zero vector)
    # row 1: orthogonal, KL = sum p (lp - lq) with lp - lq = (1, -1) * 1 -> (e - 1) / (e + 1)
    kl0 = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
    kl1 = (np.e - 1) / (np.e + 1)
    assert m["kl_mean"] == pytest.approx((kl0 + kl1) / 2)
    assert m["cosine_min"] == pytest.approx(0.0) and m["top1_agreement"] == 0.0
    assert m["max_abs_diff"] == pytest.approx(np.log(3.0))


def test_log_softmax_is_stable_for_large_logits():
    out = log_softmax(np.array([[1000.0, 1000.0]]))
    np.testing.assert_allclose(out, np.log([[0.5, 0.5]]))
