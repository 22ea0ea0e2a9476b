"""Released score_sde and EDM weights: score_sde's msgpack checkpoints, EDM's persistence pickles (never
executed) and diffusers' ScoreSdeVePipeline folders.

Fixtures (tests/data): `score_sde_ncsnpp_names.json` holds the parameter names and shapes that score_sde's
own models/ncsnpp.py gets under Flax for five tiny configs (recorded shape-only); `edm_song_unet_reference.json`
holds the state-dict names of EDM's own SongUNet for three tiny configs and its outputs for the weights
`edm_weights` makes, computed by EDM's training/networks.py with PyTorch.
"""

import collections
import json
import pathlib
import pickle
import sys
import types

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # parity with the PyTorch originals; skipped where torch is absent

from jaxdiff.readers import edm_pickle, score_diffusers, score_folders, score_sde_checkpoint
from jaxdiff.models import ncsnpp, song_unet

DATA = pathlib.Path(__file__).parent / "data"
SCORE_SDE = json.loads((DATA / "score_sde_ncsnpp_names.json").read_text())
EDM = json.loads((DATA / "edm_song_unet_reference.json").read_text())


# --------------------------------------------------------------------------- score_sde msgpack checkpoints


def tiny_ncsnpp_config(case: str):
    config = ncsnpp.default_config()
    config.update(dict(SCORE_SDE[case]["config"], num_channels=3))
    for key in ("ch_mult", "attn_resolutions", "fir_kernel"):
        config[key] = tuple(config[key])
    return config


def our_shapes(config):
    model = ncsnpp.create_ncsnpp(config)
    size = config.image_size
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.ones((1,)))
    return {p: tuple(s.shape) for p, s in flax.traverse_util.flatten_dict(abstract["params"]).items()}


@pytest.mark.parametrize("case", sorted(SCORE_SDE))
def test_names_are_those_score_sde_creates(case):
    config = tiny_ncsnpp_config(case)
    names = score_sde_checkpoint.score_sde_names(config, our_shapes(config))
    assert {name: list(shape) for name, shape in names.values()} == SCORE_SDE[case]["params"]


def test_ddpm_model_names_use_its_block_classes():
    """score_sde's models/ddpm.py creates ResnetBlockDDPM / AttnBlock / Downsample / Upsample in NCSNpp's order."""
    config = tiny_ncsnpp_config("ddpm_blocks")
    names = score_sde_checkpoint.score_sde_names(config, our_shapes(config), ddpm_model=True)
    assert names["down_1", "block_0", "shortcut", "kernel"] == ("ResnetBlockDDPM_1/NIN_0/W", (16, 32))
    assert names["down_1", "attn_0", "norm", "scale"][0] == "AttnBlock_0/GroupNorm_0/scale"
    assert names["mid_attn_1", "v", "bias"][0] == "AttnBlock_1/NIN_2/b"
    assert names["up_2", "block_1", "temb_proj", "kernel"][0] == "ResnetBlockDDPM_6/Dense_0/kernel"
    assert names["down_0", "downsample", "conv", "kernel"][0] == "Downsample_0/Conv_0/kernel"
    assert names["conv_out", "bias"][0] == "Conv_1/bias"


def random_tree(names: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    flat = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in sorted(names.items())}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def write_checkpoint(path: pathlib.Path, ema: dict, target: dict) -> None:
    """A score_sde training state as flax.training.checkpoints writes it (flax.optim Adam optimizer)."""
    zeros = jax.tree.map(np.zeros_like, target)
    state = {
        "step": 7, "lr": 2e-4, "model_state": {}, "ema_rate": 0.9999, "params_ema": ema,
        "optimizer": {"state": {"step": 7, "param_states": jax.tree.map(lambda z: {"grad_ema": z, "grad_sq_ema": z},
                                                                        zeros)},
                      "target": target},
        "rng": np.array([0, 42], np.uint32),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.msgpack_serialize(state))


# Our parameter <- score_sde's, written out by hand for the "skips" case (3 levels, BigGAN blocks,
# input_skip / output_skip pyramids) and the "ddpm_blocks" case (NIN shortcuts).
SKIPS_PAIRS = {
    ("fourier_embedding", "W"): "GaussianFourierProjection_0/W",
    ("temb_dense1", "kernel"): "Dense_1/kernel",
    ("conv_in", "kernel"): "Conv_0/kernel",
    ("down_0", "block_0", "conv1", "kernel"): "ResnetBlockBigGANpp_0/Conv_0/kernel",
    ("down_0", "downsample", "shortcut", "kernel"): "ResnetBlockBigGANpp_1/Conv_2/kernel",
    ("down_1", "pyramid_combine", "kernel"): "Combine_1/Conv_0/kernel",
    ("down_1", "attn_0", "norm", "scale"): "AttnBlockpp_0/GroupNorm_0/scale",
    ("mid_attn_1", "k", "kernel"): "AttnBlockpp_1/NIN_1/W",
    ("mid_block_2", "temb_proj", "bias"): "ResnetBlockBigGANpp_6/Dense_0/bias",
    ("up_1", "attn", "proj_out", "bias"): "AttnBlockpp_2/NIN_3/b",
    ("up_1", "upsample", "norm2", "scale"): "ResnetBlockBigGANpp_12/GroupNorm_1/scale",
    ("up_2", "pyramid_conv", "kernel"): "Conv_1/kernel",
    ("up_0", "pyramid_conv", "bias"): "Conv_3/bias",
    ("up_0", "pyramid_norm", "bias"): "GroupNorm_2/bias",
}
DDPM_BLOCKS_PAIRS = {
    ("down_1", "block_0", "shortcut", "kernel"): "ResnetBlockDDPMpp_1/NIN_0/W",
    ("down_1", "downsample", "conv", "kernel"): "Downsample_1/Conv_0/kernel",
    ("up_1", "upsample", "conv", "bias"): "Upsample_1/Conv_0/bias",
    ("norm_out", "scale"): "GroupNorm_0/scale",
    ("conv_out", "kernel"): "Conv_1/kernel",
}


@pytest.mark.parametrize("case, pairs", [("skips", SKIPS_PAIRS), ("ddpm_blocks", DDPM_BLOCKS_PAIRS)])
def test_checkpoint_params_are_what_was_written(tmp_path, monkeypatch, case, pairs):
    config = tiny_ncsnpp_config(case)
    monkeypatch.setattr(score_sde_checkpoint, "network_config", lambda name: config)
    names = SCORE_SDE[case]["params"]
    ema, target = random_tree(names, 1), random_tree(names, 2)
    write_checkpoint(tmp_path / "checkpoints" / "checkpoint_3", ema, target)
    write_checkpoint(tmp_path / "checkpoints" / "checkpoint_12", ema, target)  # the newest: 12 > 3
    write_checkpoint(tmp_path / "checkpoints-meta" / "checkpoint_13", target, target)
    (tmp_path / "checkpoints" / "checkpoint_3").write_bytes(b"older, not read")

    name, net_config, params, info = score_sde_checkpoint.read_score_sde_checkpoint(tmp_path, "vp/ddpmpp_continuous")
    _, _, raw, _ = score_sde_checkpoint.read_score_sde_checkpoint(tmp_path / "checkpoints" / "checkpoint_12",
                                                                 "vp/ddpmpp_continuous", ema=False)  # fmt: skip
    assert name == "ncsnpp" and net_config is config
    assert info["process"] == "vp" and info["parameterization"] == "eps" and info["noise_labels"] == "999t"
    flat, flat_raw = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(raw)
    written = flax.traverse_util.flatten_dict(ema, sep="/")
    written_raw = flax.traverse_util.flatten_dict(target, sep="/")
    assert len(flat) == len(written)
    for ours, theirs in pairs.items():
        np.testing.assert_array_equal(flat[ours].reshape(written[theirs].shape), written[theirs])
        np.testing.assert_array_equal(flat_raw[ours].reshape(written[theirs].shape), written_raw[theirs])
    assert flat[next(iter(pairs))].dtype == np.float32
    shapes = our_shapes(config)
    assert all(flat[p].shape == s for p, s in shapes.items())
    np.testing.assert_allclose(sorted(float(a.sum()) for a in flat.values()),
                               sorted(float(a.sum()) for a in written.values()), rtol=1e-6)  # fmt: skip


def test_checkpoint_mismatch_lists_every_tensor_by_name(tmp_path, monkeypatch):
    config = tiny_ncsnpp_config("ncsnpp")
    monkeypatch.setattr(score_sde_checkpoint, "network_config", lambda name: config)
    ema = flax.traverse_util.flatten_dict(random_tree(SCORE_SDE["ncsnpp"]["params"], 0), sep="/")
    del ema["ResnetBlockBigGANpp_2/Conv_1/kernel"]
    ema["AttnBlockpp_0/NIN_2/W"] = np.zeros((3, 3), np.float32)
    ema["Extra_0/kernel"] = np.zeros(2, np.float32)
    ckpt = tmp_path / "checkpoint_1"
    tree = flax.traverse_util.unflatten_dict(ema, sep="/")
    write_checkpoint(ckpt, tree, tree)
    with pytest.raises(score_sde_checkpoint.ScoreSdeCheckpointError) as err:
        score_sde_checkpoint.read_score_sde_checkpoint(ckpt, "ve/ncsnpp_continuous")
    message = str(err.value)
    assert str(ckpt) in message and "'ve/ncsnpp_continuous'" in message
    assert "missing:\n    ResnetBlockBigGANpp_2/Conv_1/kernel" in message
    assert "AttnBlockpp_0/NIN_2/W: shape (3, 3), expected (32, 32)" in message
    assert "unexpected:\n    Extra_0/kernel" in message


def test_checkpoint_of_another_network_is_refused_by_name(tmp_path):
    """A tiny DDPM++ checkpoint is not the CIFAR-10 DDPM++ that `vp/ddpmpp_continuous` names."""
    tree = random_tree(SCORE_SDE["ddpmpp"]["params"], 0)
    write_checkpoint(tmp_path / "checkpoint_5", tree, tree)
    expected = (r"'vp/ddpmpp_continuous': .*checkpoint_5 \(params_ema\) does not fit(.|\n)*"
                r"Conv_0/kernel: shape \(3, 3, 3, 16\), expected \(3, 3, 3, 128\)")
    with pytest.raises(ValueError, match=expected):
        score_sde_checkpoint.read_score_sde_checkpoint(tmp_path / "checkpoint_5", "vp/ddpmpp_continuous")


def test_bad_checkpoint_inputs(tmp_path):
    with pytest.raises(score_sde_checkpoint.ScoreSdeCheckpointError, match=r"unknown score_sde config 've/ncsn'.*"
                                                                           r"'ve/ncsnpp_continuous'"):  # fmt: skip
        score_sde_checkpoint.read_score_sde_checkpoint(tmp_path / "missing", "ve/ncsn")
    with pytest.raises(score_sde_checkpoint.ScoreSdeCheckpointError, match="no score_sde checkpoint"):
        score_sde_checkpoint.read_score_sde_checkpoint(tmp_path, "vp/ddpm")
    tree = random_tree(SCORE_SDE["ddpmpp"]["params"], 0)
    write_checkpoint(tmp_path / "checkpoint_2", tree, tree)
    data = (tmp_path / "checkpoint_2").read_bytes()
    (tmp_path / "checkpoint_2").write_bytes(data[: len(data) // 2])
    with pytest.raises(score_sde_checkpoint.ScoreSdeCheckpointError, match=r"checkpoint_2: not a readable msgpack"):
        score_sde_checkpoint.read_score_sde_checkpoint(tmp_path, "vp/ddpm")
    (tmp_path / "checkpoint_2").write_bytes(flax.serialization.msgpack_serialize({"step": 1}))
    with pytest.raises(score_sde_checkpoint.ScoreSdeCheckpointError, match=r"no params_ema; found \['step'\]"):
        score_sde_checkpoint.read_score_sde_checkpoint(tmp_path, "vp/ddpm")


# Millions of parameters of score_sde's CIFAR-10 networks, counted from its own model code.
SCORE_SDE_MILLIONS = {"ddpm": 35.22, "ddpmpp": 61.80, "ddpmpp_deep": 106.63, "ncsnpp_discrete": 62.69,
                      "ncsnpp": 62.76, "ncsnpp_deep": 107.59}  # fmt: skip


def test_every_named_config_has_distinct_names_and_score_sde_sizes():
    seen = set()
    for name, (variant, info) in score_sde_checkpoint.CONFIGS.items():
        config = score_sde_checkpoint.network_config(name)
        assert config == ncsnpp.cifar10_config(variant)
        assert info["process"] == name.split("/")[0]
        assert info["parameterization"] == ("score" if info["process"] == "ve" else "eps")
        if variant in seen:
            continue
        seen.add(variant)
        shapes = our_shapes(config)
        names = score_sde_checkpoint.score_sde_names(config, shapes, ddpm_model=variant == "ddpm")
        assert len({name for name, _ in names.values()}) == len(shapes)
        count = sum(int(np.prod(shape)) for _, shape in names.values())
        assert round(count / 1e6, 2) == SCORE_SDE_MILLIONS[variant]
    assert seen == set(SCORE_SDE_MILLIONS)


# --------------------------------------------------------------------------- EDM persistence pickles

EXPLODING_SOURCE = "raise SystemExit('module_src was executed')\n"


def edm_weights(shapes: dict) -> dict:
    """The weights the reference outputs were computed with (EDM's resampling filters are left as built)."""
    rng = np.random.default_rng(0)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("resample_filter"):
            continue
        if len(shape) > 1:
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            is_norm = name.split(".")[-2].startswith("norm") or name.endswith("aux_norm.weight")
            w = 0.5 * rng.standard_normal(shape) + (1.0 if is_norm else 0.0)
        out[name] = w.astype(np.float32)
    return out


def resample_filter(taps, shape):
    f = np.asarray(taps, np.float32)
    return (np.outer(f, f) / f.sum() ** 2).reshape(shape)


@pytest.fixture
def edm_modules(monkeypatch):
    """EDM's `torch_utils.persistence` and `dnnlib.util` as pickle sees them: names only (never called)."""

    def reconstruct(meta):
        raise AssertionError("the test's reconstruct function must never be called")

    class EasyDict(dict):
        pass

    reconstruct.__module__, reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    modules = {name: types.ModuleType(name) for name in ("torch_utils", "torch_utils.persistence", "dnnlib",
                                                         "dnnlib.util")}  # fmt: skip
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = reconstruct
    modules["dnnlib.util"].EasyDict = EasyDict
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return reconstruct, EasyDict


def persistent_class(reconstruct):
    class Persistent(torch.nn.Module):
        """Pickles as EDM's persistent classes do: reconstruct(meta) with the module's __dict__ as state."""

        def __init__(self, class_name, **init_kwargs):
            super().__init__()
            self.edm_class_name = class_name
            self._init_args, self._init_kwargs = (), init_kwargs

        def __reduce__(self):
            state = dict(self.__dict__)
            name = state.pop("edm_class_name")
            meta = dict(type="class", version=6, module_src=EXPLODING_SOURCE, class_name=name, state=state)
            return reconstruct, (meta,)

    return Persistent


def write_snapshot(path, edm_modules, precond: str, precond_kwargs: dict, net_class: str, net_kwargs: dict,
                   tensors: dict, protocol: int = 4) -> None:  # fmt: skip
    """An EDM `network-snapshot-*.pkl`: dict(ema=precond(model=network), loss_fn, augment_pipe, dataset_kwargs).
    Its blocks record NumPy scalars among their constructor arguments, as EDM's UNetBlocks do."""
    reconstruct, easy_dict = edm_modules
    Persistent = persistent_class(reconstruct)
    block_kwargs = dict(skip_scale=np.sqrt(0.5), init_attn=dict(init_weight=np.float32(0.2)), eps=1e-6)
    network = Persistent(net_class, **net_kwargs)
    for name, value in tensors.items():
        *parents, leaf = name.split(".")
        module = network
        for part in parents:
            if part not in module._modules:
                child = torch.nn.ModuleDict() if part in ("enc", "dec") else Persistent("UNetBlock", **block_kwargs)
                module.add_module(part, child)
            module = module._modules[part]
        value = torch.from_numpy(np.ascontiguousarray(value))
        if leaf in ("freqs", "resample_filter"):
            module.register_buffer(leaf, value)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    ema = Persistent(precond, img_resolution=net_kwargs["img_resolution"], img_channels=3, **precond_kwargs)
    ema.add_module("model", network)
    snapshot = dict(ema=ema, loss_fn=Persistent("EDMLoss", P_mean=-1.2), augment_pipe=None,
                    dataset_kwargs=easy_dict(class_name="training.dataset.ImageFolderDataset", xflip=False))
    with open(path, "wb") as f:
        pickle.dump(snapshot, f, protocol=protocol)


PRECONDS = {"ddpmpp": ("VPPrecond", {"beta_d": 19.0}), "ncsnpp": ("VEPrecond", {}),
            "skips": ("EDMPrecond", {"sigma_data": 0.25})}  # fmt: skip
PROTOCOLS = {"ddpmpp": 2, "ncsnpp": 4, "skips": 5}  # protocol 2 stores bytes through _codecs.encode


def case_tensors(case: str) -> dict:
    ref = EDM[case]
    tensors = edm_weights(ref["state_dict"])
    taps = ref["kwargs"].get("resample_filter", [1, 1])
    for name, shape in ref["state_dict"].items():
        if name.endswith("resample_filter"):
            tensors[name] = resample_filter(taps, shape)
    return tensors


@pytest.mark.parametrize("case", sorted(EDM))
def test_snapshot_network_gives_edm_outputs(tmp_path, edm_modules, case):
    ref = EDM[case]
    precond, precond_kwargs = PRECONDS[case]
    path = tmp_path / "network-snapshot-000000.pkl"
    write_snapshot(path, edm_modules, precond, precond_kwargs, "SongUNet", ref["kwargs"], case_tensors(case),
                   PROTOCOLS[case])  # fmt: skip

    name, config, params, info = edm_pickle.read_edm_snapshot(path)
    assert name == "song_unet"
    assert config.encoder_type == ref["kwargs"].get("encoder_type", "standard")
    assert config.channel_mult == tuple(ref["kwargs"]["channel_mult"])
    expected_info = {
        "VPPrecond": dict(process="vp", parameterization="vp_precond", beta_d=19.0, beta_min=0.1, beta_max=19.1,
                          M=1000.0, epsilon_t=1e-5),
        "VEPrecond": dict(process="ve", parameterization="ve_precond", sigma_min=0.02, sigma_max=100.0),
        "EDMPrecond": dict(process="edm", parameterization="edm_precond", sigma_min=0.0, sigma_max=float("inf"),
                           sigma_data=0.25),
    }[precond]  # fmt: skip
    assert info == expected_info
    labels = None if ref["class_labels"] is None else np.asarray(ref["class_labels"], np.float32)
    augment = None if ref["augment_labels"] is None else np.asarray(ref["augment_labels"], np.float32)
    out = song_unet.create_song_unet(config).apply(
        {"params": params}, np.asarray(ref["x"], np.float32), np.asarray(ref["noise_labels"], np.float32), labels,
        augment_labels=augment,
    )  # fmt: skip
    expected = np.asarray(ref["output"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_snapshot_with_a_wrong_tensor_lists_it(tmp_path, edm_modules):
    ref = EDM["ddpmpp"]
    tensors = case_tensors("ddpmpp")
    tensors["enc.4x4_block0.affine.weight"] = np.zeros((5, 5), np.float32)
    del tensors["map_layer1.bias"]
    path = tmp_path / "snapshot.pkl"
    write_snapshot(path, edm_modules, "EDMPrecond", {}, "SongUNet", ref["kwargs"], tensors)
    with pytest.raises(edm_pickle.EdmPickleError) as err:
        edm_pickle.read_edm_snapshot(path)
    assert "missing:\n    model.map_layer1.bias" in str(err.value)
    assert "model.enc.4x4_block0.affine.weight: shape (5, 5), expected (32, 64)" in str(err.value)


def test_dhariwal_unet_is_refused(tmp_path, edm_modules):
    path = tmp_path / "snapshot.pkl"
    write_snapshot(path, edm_modules, "EDMPrecond", {}, "DhariwalUNet", {"img_resolution": 8}, {})
    with pytest.raises(edm_pickle.EdmPickleError, match=r"snapshot.pkl: network DhariwalUNet is not supported"):
        edm_pickle.read_edm_snapshot(path)


class CallsGlobal:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function, named", [(eval, "builtins.eval"), (__import__("os").system, ".system"),
                                             (collections.Counter, "collections.Counter")])  # fmt: skip
def test_other_globals_are_refused_by_name(tmp_path, edm_modules, function, named):
    path = tmp_path / "snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": CallsGlobal(function, "__import__('sys').exit('called')")}, f)
    with pytest.raises(edm_pickle.EdmPickleError) as err:
        edm_pickle.read_edm_snapshot(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refusing to load global" in message and named in message


def test_not_a_snapshot(tmp_path):
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(pickle.dumps({"ema": 3}))
    with pytest.raises(edm_pickle.EdmPickleError, match="no persistent 'ema' network"):
        edm_pickle.read_edm_snapshot(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(edm_pickle.EdmPickleError, match="snapshot.pkl: not a readable EDM snapshot"):
        edm_pickle.read_edm_snapshot(path)
    with pytest.raises(edm_pickle.EdmPickleError, match="no such file"):
        edm_pickle.read_edm_snapshot(tmp_path / "missing.pkl")


# --------------------------------------------------------------------------- diffusers ScoreSdeVePipeline folders


def save_ve_pipeline(folder):
    from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        time_embedding_type="fourier", mid_block_scale_factor=2**0.5, norm_num_groups=None, norm_eps=1e-6,
        attention_head_dim=None, act_fn="silu",
    )  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p))
    scheduler = ScoreSdeVeScheduler(num_train_timesteps=500, snr=0.17, sigma_min=0.02, sigma_max=348.0)
    ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return unet


def test_score_sde_ve_folder(tmp_path):
    unet = save_ve_pipeline(tmp_path / "pipe")
    name, config, params, info = score_folders.read_score_sde_ve_folder(tmp_path / "pipe")
    assert name == "ncsnpp"
    assert config == score_diffusers.config_from_diffusers(dict(unet.config))
    expected = score_diffusers.params_from_diffusers(config, {k: v.numpy() for k, v in unet.state_dict().items()})
    flat, flat_expected = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(expected)
    assert flat.keys() == flat_expected.keys()
    for path, value in flat_expected.items():
        np.testing.assert_array_equal(flat[path], value)
    assert info["process"] == "ve" and info["sigma_min"] == 0.02 and info["sigma_max"] == 348.0
    assert info["scale_by_sigma"] and info["network_input"] == "x" and info["data_range"] == (0.0, 1.0)
    assert info["sampling"] == dict(sampler="pc", predictor="reverse_diffusion", corrector="langevin",
                                    snr=pytest.approx(0.17), n_corrector=1, steps=499)  # fmt: skip


def test_score_folder_errors(tmp_path):
    with pytest.raises(score_folders.ScoreFolderError, match=r"model_index.json: missing"):
        score_folders.read_score_sde_ve_folder(tmp_path)
    save_ve_pipeline(tmp_path / "pipe")
    index = tmp_path / "pipe" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "DDPMPipeline"}))
    with pytest.raises(score_folders.ScoreFolderError, match=r"'DDPMPipeline'; expected ScoreSdeVePipeline"):
        score_folders.read_score_sde_ve_folder(tmp_path / "pipe")
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "ScoreSdeVePipeline"}))
    scheduler = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "sigma_min": 500.0}))
    with pytest.raises(score_folders.ScoreFolderError, match=r"need sigma_min < sigma_max, got 500.0, 348.0"):
        score_folders.read_score_sde_ve_folder(tmp_path / "pipe")
