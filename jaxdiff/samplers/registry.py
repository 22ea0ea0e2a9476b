"""The sampler registry: every sampler jaxdiff knows, once, as a `SamplerSpec`.

A spec names the families the sampler runs in, with its default steps in each:
  discrete    the pixel DDPM schedule (`jaxdiff.samplers.sample`, model called at 0-based steps t);
  continuous  σ-process models seen through EDM's D(x; σ) (`jaxdiff.samplers.sample_continuous`);
  latent      the Stable Diffusion path (`jaxdiff.latent`), matched to a diffusers scheduler class.
σ is the noise level of x = x_0 + σ·n; a σ grid `levels` is decreasing, its last entry 0 (or σ_min).
A continuous sampler may also have a run of its own on the flow processes (`FlowSpec`: the interpolants
`flow` and `gvp` of `jaxdiff.processes`, integrated in their time t from 1 to 0), which `run_of` picks for
such a process in place of its σ-based run; its options are then the `FlowSpec`'s, whose `config.sampling` keys
`flow_config_options` lists.

Its options (the continuous family's keyword options, `config.sampling` keys and CLI flags) are a frozen
dataclass whose fields carry their default and what they accept (`option`); constructing it checks them.
Everything else is generated from `REGISTRY`: `jaxdiff.samplers.SAMPLERS`, `DEFAULT_STEPS`, `DEFAULT_SPACING`,
`CONTINUOUS_SAMPLERS`, `DEFAULT_CONTINUOUS_STEPS`, the latent lists of `jaxdiff.latent.schedulers`, the CLI
sampler flags and the `config.sampling` specs. The entries are in `jaxdiff.samplers.entries`, which the package
imports first (this module sits below the algorithm modules, so the discrete and continuous front ends can read
it without importing them): a new sampler is one module plus one `register(SamplerSpec(...))` there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jaxdiff.checks import Spec
from jaxdiff.errors import UsageError
from jaxdiff.processes import FlowProcess

FAMILIES = ("discrete", "continuous", "latent")


# --------------------------------------------------------------------------- options


def option(default: Any, spec: Spec, *, config: bool = True, noun: str | None = None) -> dataclasses.Field:
    """A field of an options dataclass: its default and `spec`, what it accepts. `config`: also a
    `config.sampling` key and a CLI flag. `noun` names a choice in errors ("unknown ODE solver 'x'")."""
    return dataclasses.field(default=default, metadata={"spec": spec, "config": config, "noun": noun})


@dataclasses.dataclass(frozen=True)
class Options:
    """The base of the options dataclasses: construction checks every field against its spec (a UsageError
    naming the option and what is allowed), then `check` the fields together."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            spec, value = field.metadata["spec"], getattr(self, field.name)
            if spec.accepts(value, numpy=True):
                continue
            if spec.choices:
                noun = field.metadata["noun"] or field.name
                raise UsageError(f"unknown {noun} {value!r}; expected one of {spec.choices}")
            raise UsageError(f"{field.name}={value!r} must be {spec.allowed()}")
        self.check()

    def check(self) -> None:
        """Checks between fields; none by default."""


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    pass


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class LatentSpec:
    """How a sampler runs on the latent path, as the diffusers scheduler class `scheduler_class` does.

    default_spacing  the class's timestep_spacing default, which `from_config` takes when a config has none;
    default_clip     the class's clip_sample default (None: the class has no such key);
    run              the σ-grid run `(denoiser, levels [N + 1] NumPy, unscaled x_start, scheduler settings, rng)
                     -> final latents`; None: on the training steps visited (ddpm: `jaxdiff.samplers.sample` on
                     the respaced schedule; ddim, pndm: `jaxdiff.latent.schedulers.denoise`);
    grid             the sampler whose σ grid the class builds (None: its own);
    karras           whether the class has `use_karras_sigmas`;
    rounded_steps    whether the class calls the U-Net at integer steps (else at fractional ones);
    unscaled_state   whether the class's state is the unscaled x (init_noise_sigma σ_max) rather than x_t;
    thresholding     whether the class has `thresholding` (dynamic thresholding of x̂_0);
    zero_snr_last    ᾱ of the last training step after the class's `rescale_betas_zero_snr` (0, or 2**-24 where
                     the class keeps σ finite; None: the class has no such key).
    """

    scheduler_class: str
    default_spacing: str
    default_clip: bool | None = None
    run: Callable | None = None
    grid: str | None = None
    karras: bool = True
    rounded_steps: bool = False
    unscaled_state: bool = False
    thresholding: bool = False
    zero_snr_last: float | None = None


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """How a continuous sampler runs on a flow process, in place of its σ-based `continuous` run.

    run      `(denoiser, process, x_T, noise_key, steps, **options) -> (x̂_0, nfe)`, in the time t of the
             interpolant from t = 1 (x_T) to t = 0;
    options  its options dataclass (a subclass of `Options`);
    steps    its default steps.
    """

    run: Callable
    options: type = NoOptions
    steps: int | None = None


class Run(NamedTuple):
    """What `sample_continuous` runs for a sampler on a process: the run, its options dataclass, its default steps."""

    run: Callable
    options: type
    steps: int | None


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler.

    name           the `sampler=` name;
    steps          family -> default steps, for the families it supports (None: all T steps for discrete,
                   the solver's own for continuous `ode`);
    options        the options dataclass (a subclass of `Options`) of the continuous family;
    continuous     the continuous run `(denoiser, process, x_T, noise_key, steps, **options) -> (x̂_0, nfe)`;
    on_levels      the σ-grid steps the discrete family runs through `processes.from_schedule`:
                   `(denoiser, x, levels, noise_key, *, every, ...) -> x̂_0` (None: DDPM's ancestral steps);
    spacing        the discrete family's default timestep spacing;
    latent         the latent family's `LatentSpec`;
    flow           its own run on the flow processes (`FlowSpec`; None: the continuous run serves them too).
    """

    name: str
    steps: Mapping[str, int | None]
    options: type = NoOptions
    continuous: Callable | None = None
    on_levels: Callable | None = None
    spacing: str = "uniform"
    latent: LatentSpec | None = None
    flow: FlowSpec | None = None

    @property
    def families(self) -> tuple[str, ...]:
        """The families it supports, in `FAMILIES` order."""
        return tuple(family for family in FAMILIES if family in self.steps)


REGISTRY: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    """Adds `spec` under spec.name (the names of every generated list follow this order), after checking that
    its families are known and that it has the run of each (discrete: `on_levels` or DDPM's tables)."""
    unknown = sorted(set(spec.steps) - set(FAMILIES))
    if unknown:
        raise UsageError(f"sampler {spec.name!r}: unknown families {unknown}; expected some of {FAMILIES}")
    missing = [family for family, part in (("continuous", spec.continuous), ("latent", spec.latent))
               if family in spec.steps and part is None]  # fmt: skip
    if spec.flow is not None and "continuous" not in spec.steps:
        missing.append("continuous (a flow run is one of a continuous sampler)")
    options = [spec.options] + ([spec.flow.options] if spec.flow else [])
    if missing or not all(issubclass(kind, Options) for kind in options):
        raise UsageError(f"sampler {spec.name!r}: needs Options subclasses and the run of {missing}")
    REGISTRY[spec.name] = spec
    return spec


def sampler_spec(name: str, family: str | None = None) -> SamplerSpec:
    """The spec of sampler `name` (one of `family`'s, when given); UsageError naming the choices otherwise."""
    names = samplers_for(family) if family else tuple(REGISTRY)
    if name not in names:
        raise UsageError(f"unknown sampler {name!r}; expected one of {names}")
    return REGISTRY[name]


def samplers_for(family: str) -> tuple[str, ...]:
    """The names of the samplers of `family` (discrete, continuous or latent), in registry order."""
    if family not in FAMILIES:
        raise UsageError(f"unknown sampler family {family!r}; expected one of {FAMILIES}")
    return tuple(name for name, spec in REGISTRY.items() if family in spec.steps)


def default_steps(family: str) -> dict[str, int]:
    """Sampler -> default steps in `family`, for the samplers that have a fixed default."""
    return {name: REGISTRY[name].steps[family] for name in samplers_for(family) if REGISTRY[name].steps[family]}


def run_of(name: str, process) -> Run:
    """The `Run` of continuous sampler `name` on `process`: its `FlowSpec`'s on a flow process when it has one,
    else its continuous run (a UsageError naming the choices for an unknown name)."""
    spec = sampler_spec(name, "continuous")
    if spec.flow is not None and isinstance(process, FlowProcess):
        return Run(spec.flow.run, spec.flow.options, spec.flow.steps)
    return Run(spec.continuous, spec.options, spec.steps["continuous"])


def _options_of(name: str, process) -> type:
    """The options dataclass of sampler `name`: on `process` when given (`run_of`), else its own."""
    return sampler_spec(name).options if process is None else run_of(name, process).options


def check_options(name: str, options: Mapping[str, Any], process=None) -> dict:
    """`options` of sampler `name` (on `process`, when given: see `run_of`) checked, with the defaults of those not
    given: a UsageError in one line naming an unknown option or a bad value and what is allowed."""
    known = _options_of(name, process)
    allowed = sorted(field.name for field in dataclasses.fields(known))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for sampler {name!r}; allowed: {allowed}")
    return dataclasses.asdict(known(**options))


def config_options() -> dict[str, tuple[Any, Spec, tuple[str, ...]]]:
    """The options that are `config.sampling` keys and CLI flags: name -> (default, spec, the samplers that take
    it), in registry order. An option shared by several samplers has one default and spec."""
    return _config_fields((name, spec.options) for name, spec in REGISTRY.items())


def flow_config_options() -> dict[str, tuple[Any, Spec, tuple[str, ...]]]:
    """The options of the samplers' flow runs (`FlowSpec`) that are `config.sampling` keys, as `config_options`."""
    return _config_fields((name, spec.flow.options) for name, spec in REGISTRY.items() if spec.flow)


def _config_fields(options) -> dict[str, tuple[Any, Spec, tuple[str, ...]]]:
    """name -> (default, spec, users) of the config fields of the (sampler, options dataclass) pairs `options`."""
    found = {}
    for name, kind in options:
        for field in dataclasses.fields(kind):
            if field.metadata["config"]:
                default, option_spec, users = found.get(field.name, (field.default, field.metadata["spec"], ()))
                found[field.name] = (default, option_spec, users + (name,))
    return found


def options_from_config(name: str, sampling_config, process=None) -> dict:
    """The options of sampler `name` (on `process`, when given: see `run_of`) that `config.sampling` holds (its
    config keys), read from it."""
    return {field.name: sampling_config[field.name] for field in dataclasses.fields(_options_of(name, process))
            if field.metadata["config"]}  # fmt: skip
