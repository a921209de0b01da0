"""Models: exact sizes and costs (docs/reference.md section 2), PaddleClas layout, shapes, options."""

import numpy as np
import paddle
import pytest

from conftest import read_tsv, twin_models
from ppdpn.models import create_model, list_models, register_model
from ppdpn.models.__main__ import PUBLISHED
from ppdpn.models.flops import count_macs, count_params, format_table
from ppdpn.models.weights import to_paddleclas_state_dict


# (trainable params, params incl. BN running stats): the sums over PaddleClas's published
# state_dicts (the .tsv files); docs/reference.md rounds them to 3 decimals in millions.
SIZES = {
    "DPN68": (12_611_602, 12_676_718), "DPN92": (37_668_392, 37_793_608),
    "DPN98": (61_570_728, 61_735_624), "DPN107": (86_917_800, 87_131_624),
    "DPN131": (79_254_504, 79_477_864), "DenseNet121": (7_978_856, 8_062_504),
    "DenseNet161": (28_681_000, 28_900_936), "DenseNet169": (14_149_480, 14_307_880),
    "DenseNet201": (20_013_928, 20_242_984), "DenseNet264": (33_337_704, 33_736_232),
}
FACTS_MILLIONS = {  # docs/reference.md section 2, as published there
    "DPN68": (12.612, 12.677), "DPN92": (37.668, 37.794), "DPN98": (61.571, 61.736),
    "DPN107": (86.918, 87.132), "DPN131": (79.255, 79.478), "DenseNet121": (7.979, 8.063),
    "DenseNet161": (28.681, 28.901), "DenseNet169": (14.149, 14.308),
    "DenseNet201": (20.014, 20.243), "DenseNet264": (33.338, 33.736),
}
FACTS_GMACS = {"DPN68": 2.326, "DPN92": 6.502, "DPN98": 11.671, "DPN107": 18.299,
               "DPN131": 16.014, "DenseNet121": 2.834, "DenseNet161": 7.728,
               "DenseNet169": 3.360, "DenseNet201": 4.291, "DenseNet264": 5.752}
TINY = ["DPNTiny", "DenseNetTiny"]


@pytest.fixture(scope="module", params=list(SIZES))
def published(request):
    """One published model at a time (module scope: pytest groups the tests by model)."""
    paddle.seed(0)
    return request.param, create_model(request.param)


def test_registry_holds_the_published_and_tiny_models():
    assert sorted(list_models()) == sorted(list(SIZES) + TINY)
    assert PUBLISHED == list(SIZES)  # the report's order: by family, then depth


def test_facts_figures_are_the_rounded_exact_counts():
    for name, (trainable, everything) in SIZES.items():
        assert (round(trainable / 1e6, 3), round(everything / 1e6, 3)) == FACTS_MILLIONS[name]


def test_param_counts_are_exact(published):
    name, model = published
    assert count_params(model) == SIZES[name]


def test_state_dict_converts_to_paddleclas_layout(published):
    name, model = published
    tsv = read_tsv(name)
    ours = [(k, list(v.shape)) for k, v in to_paddleclas_state_dict(model, name).items()]
    assert ours == tsv  # same keys, same shapes, same order
    trainable = sum(int(np.prod(s)) for k, s in tsv if not k.endswith(("_mean", "_variance")))
    assert (trainable, sum(int(np.prod(s)) for _, s in tsv)) == SIZES[name]


def test_forward_backward_and_feature_shapes(published):
    name, model = published
    model.train()
    x = paddle.randn([2, 3, 64, 64])
    features = model.forward_features(x)
    assert features.shape == [2, model.num_features, 2, 2]  # stride 32
    logits = model.forward_head(features)
    assert logits.shape == [2, 1000]
    logits.mean().backward()
    trainable = [p for p in model.parameters() if not p.stop_gradient]  # not BN stats
    missing = [p.name for p in trainable if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    assert all(np.isfinite(p.grad.numpy()).all() for p in trainable)


@pytest.mark.parametrize("name", ["DPN68", "DenseNet121"])
def test_macs_at_224_match_facts(name):
    macs = count_macs(create_model(name), (1, 3, 224, 224))
    assert round(macs / 1e9, 3) == FACTS_GMACS[name]


def test_report_table_states_conventions_and_numbers():
    table = format_table(["DPN68"])
    row = next(line for line in table.splitlines() if line.startswith("DPN68"))
    assert row.split()[1:] == ["12,611,602", "12,676,718", "2.326", "4.652"]
    assert "BatchNorm running" in table and "GFLOPs = 2 x GMACs" in table


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="unknown model 'DPN69'.*DPN68.*DenseNet121"):
        create_model("DPN69")


def test_duplicate_registration_is_refused():
    def DPN68(**kwargs):  # noqa: N802 (a model name)
        raise AssertionError("must not replace the real DPN68")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(DPN68)
    assert count_params(create_model("DPNTiny", num_classes=10))[0] > 0
    assert "DPN68" in list_models()


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_small_and_train(name):
    model = create_model(name, num_classes=10)
    trainable, _ = count_params(model)
    assert 200_000 <= trainable <= 500_000
    logits = model(paddle.randn([4, 3, 64, 64]))
    assert logits.shape == [4, 10]
    logits.mean().backward()


@pytest.mark.parametrize("name", TINY)
def test_nhwc_computes_the_same_logits(name):
    plain, nhwc = twin_models(name, data_format="NHWC")
    x = paddle.randn([2, 3, 64, 64])
    for training in (False, True):
        plain.train(training)
        nhwc.train(training)
        expected = plain(x).numpy()
        got = nhwc(x.transpose([0, 2, 3, 1])).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_recompute_gives_the_same_gradients_and_bn_stats(name):
    plain, recomputed = twin_models(name, recompute=True)
    x = paddle.randn([4, 3, 64, 64])
    for model in (plain, recomputed):
        model.train()
        (model(x) ** 2).mean().backward()
    for p, q in zip(plain.parameters(), recomputed.parameters()):
        if p.stop_gradient:  # BN running stats: compared below
            continue
        np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=p.name)
    # running stats must have moved once, exactly as without recompute
    for (key, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=key)
