"""Mixup, CutMix and label smoothing: targets sum to 1 and mix the right labels."""
import numpy as np
import paddle
import pytest

from ppdpn.data.augment import mix_batch

B, C = 6, 5


def _batch(layout="NCHW"):
    """Sample i is the constant image i + 1, so every pixel tells whose it is."""
    shape = (B, 3, 8, 12) if layout == "NCHW" else (B, 8, 12, 3)
    values = np.arange(1, B + 1, dtype=np.float32).reshape(B, 1, 1, 1)
    labels = np.array([0, 1, 2, 3, 4, 0], dtype=np.int64)
    return paddle.to_tensor(np.broadcast_to(values, shape).copy()), paddle.to_tensor(labels), labels


def test_label_smoothing_only():
    images, labels, y = _batch()
    out, t = mix_batch(images, labels, C, 0.0, 0.0, 0.1, np.random.default_rng(0))
    t = t.numpy()
    assert out is images and t.dtype == np.float32 and t.shape == (B, C)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t[np.arange(B), y], 0.9 + 0.1 / C, rtol=1e-6)
    assert np.allclose(np.delete(t[0], y[0]), 0.1 / C)


def _expected_targets(y, share_own, smoothing=0.0):
    """Own label weighted by share_own[i], the partner's (B-1-i) by the rest."""
    eye = np.eye(C)[y] * (1 - smoothing) + smoothing / C
    return share_own[:, None] * eye + (1 - share_own[:, None]) * eye[::-1]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_mixes_images_and_labels_with_one_lambda(smoothing):
    images, labels, y = _batch()
    out, t = mix_batch(images, labels, C, 0.4, 0.0, smoothing, np.random.default_rng(1))
    v = out.numpy()[:, 0, 0, 0]
    own, partner = np.arange(1, B + 1), np.arange(B, 0, -1)
    lam = (v[0] - partner[0]) / (own[0] - partner[0])
    np.testing.assert_allclose(v, lam * own + (1 - lam) * partner, rtol=1e-5)
    np.testing.assert_allclose(t.numpy().sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t.numpy(), _expected_targets(y, np.full(B, lam), smoothing), atol=1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_cutmix_pastes_a_box_and_weights_labels_by_its_area(layout):
    images, labels, y = _batch(layout)
    out, t = mix_batch(images, labels, C, 0.0, 1.0, 0.0, np.random.default_rng(2), layout)
    v = out.numpy()
    chan = v[:, 0] if layout == "NCHW" else v[..., 0]
    own = np.arange(1, B + 1).reshape(B, 1, 1)
    from_partner = (chan == own[::-1]).mean(axis=(1, 2))
    assert ((chan == own) | (chan == own[::-1])).all()  # every pixel is one or the other
    assert 0 < from_partner[0] < 1
    np.testing.assert_allclose(t.numpy().sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t.numpy(), _expected_targets(y, 1 - from_partner), atol=1e-5)


def test_both_alphas_pick_mixup_or_cutmix_per_batch_reproducibly():
    images, labels, _ = _batch()
    kinds = []
    for seed in range(40):
        out, _ = mix_batch(images, labels, C, 0.2, 1.0, 0.0, np.random.default_rng(seed))
        v = out.numpy()[0, 0]
        kinds.append("cutmix" if set(np.unique(v)) <= {1.0, float(B)} else "mixup")
        again, _ = mix_batch(images, labels, C, 0.2, 1.0, 0.0, np.random.default_rng(seed))
        assert np.array_equal(v, again.numpy()[0, 0])
    assert 10 <= kinds.count("cutmix") <= 30
