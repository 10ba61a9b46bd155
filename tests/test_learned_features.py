"""pyoptk.learned.features: config validation and counts, and each feature function."""

import math

import pytest
import torch

from pyoptk.learned import MLPConfig
from pyoptk.learned.features import (
    FeatureConfig, factored_features, factored_init, factored_state_shapes, factored_update,
    log_sign, momentum_init, momentum_update, rms_update, second_moment_scale, time_features)


def test_default_counts():
    f = FeatureConfig()
    assert (f.n_mom, f.n_rms, f.n_fac) == (5, 1, 3)
    assert f.n_normalized == 2 + 5 + 1 + 5 + 1 == 14
    assert f.n_scale_free == 2 + 3 * 4 == 14
    assert f.n_time_features == 11
    assert f.n_features == 39
    names = f.feature_names()
    assert len(names) == 39 and len(set(names)) == 39
    assert names[:2] == ["g", "p"] and names[-1] == "time[100000]"
    assert f.fac_mom_index == 2


@pytest.mark.parametrize("kw,count", [
    (dict(fac_momentum_decay=None), 36),
    (dict(momentum_decays=(0.9,), rms_decays=(0.99, 0.999), fac_momentum_decay=0.9),
     2 + 1 + 2 + 2 + 2 + 2 + 12 + 11),
    (dict(momentum_decays=(0.9,), rms_decays=(), adafactor_decays=(), time_timescales=(),
          fac_momentum_decay=None), 2 + 1 + 2),
])
def test_counts_follow_config(kw, count):
    f = FeatureConfig(**kw)
    assert f.n_features == count == len(f.feature_names())


@pytest.mark.parametrize("kw,field", [
    (dict(momentum_decays=(0.9, 1.0)), "momentum_decays"),
    (dict(momentum_decays=(-0.1,)), "momentum_decays"),
    (dict(rms_decays=(0.999999999,)), "rms_decays"),        # rounds to 1 in float32
    (dict(adafactor_decays="0.9"), "adafactor_decays"),
    (dict(fac_momentum_decay=0.95), "fac_momentum_decay"),
    (dict(log_sign_k=0.0), "log_sign_k"),
    (dict(log_sign_k=100.0), "log_sign_k"),
    (dict(time_timescales=(1.0, -3.0)), "time_timescales"),
    (dict(eps=0.0), "eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(fac_eps=-1.0), "fac_eps"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_config_names_field(kw, field):
    with pytest.raises(ValueError, match=f"FeatureConfig.{field}"):
        FeatureConfig(**kw)


@pytest.mark.parametrize("kw,field", [
    (dict(hidden_sizes=(32, 0)), "hidden_sizes"),
    (dict(exp_mult=0.0), "exp_mult"),
    (dict(step_mult=float("inf")), "step_mult"),
    (dict(features={"eps": 1.0}), "features"),
])
def test_invalid_mlp_config_names_field(kw, field):
    with pytest.raises(ValueError, match=f"MLPConfig.{field}"):
        MLPConfig(**kw)


def test_config_lists_become_tuples_and_round_trip():
    f = FeatureConfig(momentum_decays=[0.5, 0.9], time_timescales=[1, 10])
    assert f.momentum_decays == (0.5, 0.9) and f.time_timescales == (1.0, 10.0)
    assert FeatureConfig.from_dict(f.to_dict()) == f
    c = MLPConfig(features=f, hidden_sizes=[8], learn_decays=True)
    assert MLPConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown fields"):
        FeatureConfig.from_dict({"bogus": 1})


def test_momentum_and_rms_update():
    p = torch.randn(3, 4)
    m = momentum_init(p, 2)
    assert m.shape == (2, 3, 4) and m.dtype == torch.float32
    d = torch.tensor([0.5, 0.9])
    g = torch.randn(3, 4)
    m1 = momentum_update(m + 1.0, g, d)
    torch.testing.assert_close(m1[0], 0.5 * 1.0 + 0.5 * g)
    torch.testing.assert_close(m1[1], 0.9 * 1.0 + 0.1 * g)
    v1 = rms_update(torch.ones(1, 3, 4), g, torch.tensor([0.99]))
    torch.testing.assert_close(v1[0], 0.99 + 0.01 * g * g)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4), (2, 3, 5), (1, 1), (6, 1)],
                         ids=str)
def test_factored_accumulators(shape):
    F = 2
    fr_shape, fc_shape = factored_state_shapes(shape, F)
    p = torch.zeros(shape)
    fr, fc = factored_init(p, F)
    assert fr.shape == fr_shape and fc.shape == fc_shape
    decays = torch.tensor([0.5, 0.9], dtype=torch.float64)
    fr, fc = fr.double() + 0.25, fc.double() + 0.5
    g = torch.randn(shape, dtype=torch.float64)
    eps = 1e-30
    r2, c2, vbar = factored_update(fr, fc, g, decays, eps)
    vhat, row_f, col_f = factored_features(r2, c2, vbar, shape)
    n = max(1, math.prod(shape))
    if len(shape) >= 2:
        G2 = (g * g + eps).reshape(-1, shape[-1])
        for f in range(F):
            b = decays[f]
            er = b * 0.25 + (1 - b) * G2.mean(1)
            ec = b * 0.5 + (1 - b) * G2.mean(0)
            torch.testing.assert_close(r2[f], er)
            torch.testing.assert_close(c2[f], ec)
            torch.testing.assert_close(vbar[f], er.mean())
            torch.testing.assert_close(vhat[f].reshape(G2.shape), er[:, None] * ec[None] / er.mean())
            torch.testing.assert_close(row_f[f].reshape(G2.shape),
                                       (er / er.mean() + 2.0 ** -7).rsqrt()[:, None].expand(G2.shape))
            torch.testing.assert_close(col_f[f].reshape(G2.shape),
                                       (ec / er.mean() + 2.0 ** -7).rsqrt()[None].expand(G2.shape))
    else:
        assert c2.shape == (F, 0)
        for f in range(F):
            b = decays[f]
            ev = (b * 0.25 + (1 - b) * (g * g + eps)).reshape(n)
            torch.testing.assert_close(vhat[f], ev)
            torch.testing.assert_close(row_f[f], (ev / ev.mean() + 2.0 ** -7).rsqrt())
            torch.testing.assert_close(col_f[f], row_f[f])


def test_log_sign():
    k = 5.0
    x = torch.tensor([-2.0, -1e-4, 0.0, 1e-4, math.exp(-5.0), 3.0], dtype=torch.float64)
    lg, sg = log_sign(x, k)
    torch.testing.assert_close(lg, torch.tensor([math.log(2) / 5, -1, -1, -1, -1, math.log(3) / 5],
                                                dtype=torch.float64))
    torch.testing.assert_close(sg, torch.tensor([-1, -1e-4 * math.exp(5), 0, 1e-4 * math.exp(5), 1, 1],
                                                dtype=torch.float64))
    # continuous at the threshold, finite gradient at 0
    thr = math.exp(-k)
    a, b = log_sign(torch.tensor([thr * (1 - 1e-9), thr * (1 + 1e-9)], dtype=torch.float64), k)
    assert abs(a[0] - a[1]) < 1e-8 and abs(b[0] - b[1]) < 1e-8
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    sum(t.sum() for t in log_sign(z, k)).backward()
    assert torch.isfinite(z.grad).all()


def test_time_features_and_normalization():
    ts = torch.tensor([1.0, 10.0, 100.0])
    tf = time_features(torch.tensor(10.0), ts)
    torch.testing.assert_close(tf, torch.tanh(torch.tensor([9.0, 0.0, -0.9])))
    x = torch.randn(3, 50) * torch.tensor([[1e-3], [1.0], [1e3]])
    s = second_moment_scale(x, 1e-12)
    y = x * s[:, None]
    torch.testing.assert_close((y * y).mean(1), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_state_bytes():
    f = FeatureConfig()
    assert f.state_bytes((1024, 1024)) == 4 * (1 + 6 * 1024 * 1024 + 3 * 2048)
    assert f.state_bytes((1000,)) == 4 * (1 + 9 * 1000)
    assert f.state_bytes(()) == 4 * (1 + 9)
