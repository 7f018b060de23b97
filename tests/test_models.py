"""Model constructors: the paper's CNN-7, Shi initialization, compatibility checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ccdist_plugin.models import (
    CertifiedNet,
    Normalize,
    check_compatible,
    cnn3,
    cnn7,
    create_model,
    mlp,
    model_from_arch,
    shi_init,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cnn7_matches_spec():
    m = cnn7(3, 32, 10, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010])
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 128]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m.features) == 5
    assert isinstance(m.features[-2], nn.BatchNorm1d) and isinstance(m.features[-1], nn.ReLU)
    assert m.feature_dim == 512 and m.head.out_features == 10
    assert n_params(m) == 17_192_650
    m64 = cnn7(3, 64, 200)
    assert [c.stride[0] for c in m64.features if isinstance(c, nn.Conv2d)] == [1, 1, 2, 1, 2]
    assert m64(torch.rand(2, 3, 64, 64)).shape == (2, 200)
    assert cnn7(3, 64, 1000, width=1024).feature_dim == 1024
    assert isinstance(cnn7(activation="tanh").features[3], nn.Tanh)


def test_forward_is_head_of_features_and_normalization_first():
    for m in (cnn7(3, 32, 10, width=64), cnn3(1, 8, 10), mlp(1, 8, 10)):
        assert isinstance(m, CertifiedNet) and isinstance(m.features[0], Normalize)
        assert m.normalize.mean.shape[:2] == (1, m.input_shape[0]) and m.normalize.mean.ndim == 4
        x = torch.rand(3, *m.input_shape)
        m.eval()
        torch.testing.assert_close(m(x), m.head(m.features(x)))
        torch.testing.assert_close(m.without_normalization()(m.normalize(x)), m(x))


def test_shi_init_std():
    torch.manual_seed(0)
    m = cnn7(3, 32, 10, width=512, init="default")
    shi_init(m)
    layers = [l for l in m.modules() if isinstance(l, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        assert float(layer.weight.std()) == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.1)
    assert float(layers[-1].weight.abs().max()) <= 1 / math.sqrt(512) + 1e-6  # PyTorch default kept


def test_registry_and_rebuild():
    m = create_model("cnn3", in_channels=1, input_size=8, num_classes=10, width=32)
    m2 = model_from_arch(m.arch)
    m2.load_state_dict(m.state_dict())
    x = torch.rand(2, 1, 8, 8)
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")


def test_check_compatible_names_each_difference():
    s = cnn3(1, 8, 10, width=32)
    check_compatible(cnn3(1, 8, 10, width=32), s)
    with pytest.raises(ValueError, match="feature width"):
        check_compatible(cnn3(1, 8, 10, width=64), s)
    with pytest.raises(ValueError, match="input shape"):
        check_compatible(cnn3(1, 16, 10, width=32), s)
    with pytest.raises(ValueError, match="classes"):
        check_compatible(cnn3(1, 8, 5, width=32), s)
    with pytest.raises(ValueError, match="normalization"):
        check_compatible(cnn3(1, 8, 10, width=32, mean=[0.1], std=[0.3]), s)
    with pytest.raises(ValueError, match="not a CertifiedNet"):
        check_compatible(nn.Linear(2, 2), s)
    with pytest.raises(ValueError, match="channels"):
        cnn3(3, 8, 10, mean=[0.1], std=[0.2])
