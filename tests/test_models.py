"""Sanity checks for the test model zoo itself."""

import pytest
import torch

from tests.models import QUANTIZABLE_TYPES, ZOO_NAMES, build

# Quantizable layers that exist in a model but never run on the zoo inputs (e.g. an unused
# head); the hook count excludes them. Every current zoo model runs all of its layers.
_UNUSED_QUANTIZABLE: dict[str, int] = {}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_runs_and_counts_quantizable_layers(name):
    zoo_model = build(name)
    output = zoo_model.run()
    assert output.is_floating_point() and torch.isfinite(output).all()

    declared = sum(isinstance(module, QUANTIZABLE_TYPES) for module in zoo_model.model.modules())
    assert zoo_model.num_quantizable > 0
    assert zoo_model.num_quantizable == declared - _UNUSED_QUANTIZABLE.get(name, 0)


def test_build_is_deterministic():
    first, second = build("mlp", seed=3), build("mlp", seed=3)
    torch.testing.assert_close(first.run(), second.run(), rtol=0, atol=0)
