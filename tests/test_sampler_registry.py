"""The sampler registry is the single source of sampler names, default steps, options and their checks: every
generated list (samplers, latent, CLI, config specs and defaults) holds exactly the registry's entries."""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import samplers
from jaxdiff.checks import Spec
from jaxdiff.cli.sampler_flags import SAMPLER_OPTIONS, add_sampler_flags
from jaxdiff.config import validate
from jaxdiff.config.defaults import default_config
from jaxdiff.config.specs import SPECS
from jaxdiff.errors import UsageError
from jaxdiff.latent import schedulers as latent
from jaxdiff.processes import make_process
from jaxdiff.samplers.registry import (
    FAMILIES,
    REGISTRY,
    Options,
    SamplerSpec,
    check_options,
    config_options,
    default_steps,
    option,
    options_from_config,
    sampler_spec,
    samplers_for,
)


def names(family):
    return {name for name, spec in REGISTRY.items() if family in spec.families}


def test_every_generated_list_is_the_registry():
    assert set(samplers.SAMPLERS) == names("discrete") and len(samplers.SAMPLERS) == len(names("discrete"))
    assert set(samplers.CONTINUOUS_SAMPLERS) == names("continuous")
    assert set(latent.LATENT_SAMPLERS) == names("latent")
    assert set(samplers.SAMPLERS) | set(samplers.CONTINUOUS_SAMPLERS) | set(latent.LATENT_SAMPLERS) == set(REGISTRY)
    assert samplers.DEFAULT_STEPS == {n: REGISTRY[n].steps["discrete"] for n in names("discrete")
                                      if REGISTRY[n].steps["discrete"]}  # fmt: skip
    assert samplers.DEFAULT_CONTINUOUS_STEPS == default_steps("continuous")
    assert samplers.DEFAULT_SPACING == {n: REGISTRY[n].spacing for n in names("discrete")}
    assert set(latent.SIGMA_SAMPLERS) == {n for n in names("latent") if REGISTRY[n].latent.run}
    assert latent.CLASS_DEFAULT_SPACING == {n: REGISTRY[n].latent.default_spacing for n in names("latent")}
    assert set(latent.GRID_OF.values()) <= set(latent.SIGMA_SAMPLERS)


def test_the_cli_and_the_config_take_exactly_the_registry():
    parser = argparse.ArgumentParser()
    add_sampler_flags(parser)
    help_text = parser.format_help().replace("\n", " ")
    for name in REGISTRY:
        assert name in help_text
    options = config_options()
    assert set(SAMPLER_OPTIONS) == set(options) - {"eta"}  # eta is `sample`'s own --eta, shared with discrete
    assert set(SPECS["sampling.sampler"].choices) == names("discrete") | names("continuous")
    config = default_config()
    for name, (default, spec, users) in options.items():
        key = SPECS[f"sampling.{name}"]
        assert key.choices == spec.choices and (key.low, key.high) == (spec.low, spec.high)
        assert key.meaning.startswith(", ".join(users) + ": ") and config.sampling[name] == default
        for user in users:
            assert name in {field.name for field in dataclasses.fields(REGISTRY[user].options)}


def test_options_have_defaults_and_are_checked_in_one_line():
    assert check_options("pc", {}) == {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
                                       "n_corrector": 1}  # fmt: skip
    assert check_options("ddim", {"eta": 0.5})["eta"] == 0.5
    for name, options, message in [
        ("pc", {"snr": -1.0}, "snr=-1.0 must be a number >= 0"),
        ("pc", {"n_corrector": 1.5}, "n_corrector=1.5 must be an int >= 0"),
        ("pc", {"corrector": "gibbs"}, "unknown corrector 'gibbs'; expected one of ('langevin', 'ald', 'none')"),
        ("ode", {"rtol": 2.0}, "rtol=2.0 must be a number in (0, 1)"),
        ("ode", {"solver": "euler"}, "unknown ODE solver 'euler'; expected one of ('tsit5', 'dopri5')"),
        ("edm_stochastic", {"s_min": 2.0, "s_max": 1.0}, "s_max=1.0 must be a number >= s_min=2.0"),
        ("ddim", {"eta": 1.5}, "eta=1.5 must be a number in [0, 1]"),
        ("heun", {"eta": 0.5}, "unknown option(s) ['eta'] for sampler 'heun'; allowed: ['rho']"),
        ("plms", {}, "unknown sampler 'plms'; expected one of ("),
    ]:
        with pytest.raises(UsageError) as err:
            check_options(name, options)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), name
    with pytest.raises(UsageError, match=r"^unknown sampler 'ddpm'; expected one of \("):
        sampler_spec("ddpm", "continuous")
    with pytest.raises(UsageError, match="unknown sampler family 'pixel'"):
        samplers_for("pixel")


def test_options_from_config_reads_the_config_keys_of_each_sampler():
    sampling = default_config().sampling
    assert options_from_config("pc", sampling) == {"predictor": "reverse_diffusion", "corrector": "langevin",
                                                   "snr": 0.16, "n_corrector": 1}  # fmt: skip
    assert options_from_config("ode", sampling) == {"rtol": 1e-5, "atol": 1e-5}  # solver, max_steps: no config keys
    assert options_from_config("ddim", sampling) == {"eta": 0.0}
    assert options_from_config("heun", sampling) == {}
    config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    config.sampling.snr = -1.0
    with pytest.raises(ValueError, match=r"sampling.snr=-1.0 .*a number >= 0"):
        validate(config)


@dataclasses.dataclass(frozen=True)
class ShrinkOptions(Options):
    factor: float = option(0.5, Spec(float, "how far each step shrinks x toward x̂_0", low=0, high=1))


def shrink_sample(denoiser, process, x_T, noise_key, steps, *, factor):
    """A dummy sampler: x ← x + factor·(D(x; σ_max) − x), `steps` times."""
    sigma = jnp.full((x_T.shape[0],), process.noise_level(process.t_max), jnp.float32)
    x = x_T / process.alpha(process.t_max)
    for _ in range(steps):
        x = x + factor * (denoiser(x, sigma) - x)
    return x, steps


@pytest.fixture
def dummy(monkeypatch):
    spec = SamplerSpec("shrink", steps={"continuous": 3}, options=ShrinkOptions, continuous=shrink_sample)
    monkeypatch.setitem(REGISTRY, "shrink", spec)
    return spec


def test_a_registered_sampler_appears_everywhere_it_is_generated(dummy):
    assert "shrink" in samplers_for("continuous") and "shrink" not in samplers_for("latent")
    assert default_steps("continuous")["shrink"] == 3 and dummy.families == ("continuous",)
    assert config_options()["factor"][2] == ("shrink",)
    parser = argparse.ArgumentParser()
    add_sampler_flags(parser)
    assert "shrink" in parser.format_help()
    with pytest.raises(UsageError, match=r"^factor=2.0 must be a number in \[0, 1\]$"):
        check_options("shrink", {"factor": 2.0})
    x, nfe = samplers.sample_continuous(lambda x, sigma: jnp.zeros_like(x), make_process("edm"), (2, 3),
                                        jax.random.key(0), sampler="shrink", return_nfe=True)  # fmt: skip
    assert nfe == 3 and np.all(np.isfinite(np.asarray(x)))


def test_the_dummy_does_not_leak():
    assert "shrink" not in REGISTRY and all(set(spec.families) <= set(FAMILIES) for spec in REGISTRY.values())
