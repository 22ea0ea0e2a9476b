"""Families: one object per kind of pixel-space diffusion, built from a run config, that training, sampling and
evaluation ask instead of branching on the kind (`Family`): the discrete DDPM schedule (`DiscreteFamily`, t the
0-based step index), the continuous processes VE, VP, sub-VP and EDM (`ContinuousFamily`, σ the noise level of
x = x_0 + σ·n) and the flow-matching interpolants flow and gvp (`FlowFamily`, `jaxdiff.families.flow`). A new family
is one module with a `Family` subclass, registered in `FAMILIES`."""

from __future__ import annotations

import ml_collections

from jaxdiff.errors import ConfigError
from jaxdiff.families.base import Denoise, Family
from jaxdiff.families.continuous import ContinuousFamily, FlowFamily
from jaxdiff.families.discrete import DiscreteFamily

FAMILIES: dict[str, type[Family]] = {
    family.name: family for family in (DiscreteFamily, ContinuousFamily, FlowFamily)
}

__all__ = ["FAMILIES", "ContinuousFamily", "Denoise", "DiscreteFamily", "Family", "FlowFamily", "family_of"]


def family_of(config: ml_collections.ConfigDict) -> Family:
    """The family of a run config: the one whose `processes` hold `config.diffusion.process` (configs written
    before the key: "discrete")."""
    process = config.diffusion.get("process", "discrete")
    for family in FAMILIES.values():
        if process in family.processes:
            return family(config)
    known = [name for family in FAMILIES.values() for name in family.processes]
    raise ConfigError(f"diffusion.process={process!r} is not a process of any family; expected one of {known}")
