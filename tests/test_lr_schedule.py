"""LR schedules against their closed forms."""

import math

import pytest

from megatron_lite.config import OptimizerConfig
from megatron_lite.optim.lr_schedule import learning_rate


def cfg(style, **kw):
    return OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=110, lr_decay_style=style, **kw)


def test_warmup_is_linear_from_zero():
    for style in ("constant", "linear", "cosine", "wsd"):
        assert [learning_rate(i, cfg(style), 200) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
        assert learning_rate(9, cfg(style), 200) == pytest.approx(1.0)


@pytest.mark.parametrize("step", [11, 35, 60, 85, 109])
def test_decay_closed_forms(step):
    progress = (step - 10) / 100
    assert learning_rate(step - 1, cfg("constant"), 200) == 1.0
    assert learning_rate(step - 1, cfg("linear"), 200) == pytest.approx(0.1 + 0.9 * (1 - progress))
    assert learning_rate(step - 1, cfg("cosine"), 200) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    wsd = cfg("wsd", lr_wsd_decay_iters=20)
    expected = 1.0 if step <= 90 else 0.1 + 0.9 * (1 - (step - 90) / 20)
    assert learning_rate(step - 1, wsd, 200) == pytest.approx(expected)


def test_after_decay_min_lr_and_default_decay_iters():
    assert learning_rate(150, cfg("cosine"), 200) == pytest.approx(0.1)
    c = OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_iters=None, lr_decay_style="linear")
    assert learning_rate(49, c, train_iters=100) == pytest.approx(0.5)
    wsd = OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="wsd")
    assert learning_rate(89, wsd, 100) == 1.0 and learning_rate(94, wsd, 100) == pytest.approx(0.5)
