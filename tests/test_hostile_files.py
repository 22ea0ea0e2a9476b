"""Crafted weights files, snapshots, config files and settings files: each is answered by one line naming the file
and what is wrong (exit status 2 from the command line, a `JaxdiffError` from the Python API), no traceback, memory
bounded by the file's size, and nothing written.

The hostile files are built here byte by byte, without PyTorch: a pickler that writes any global by name, storages
as persistent ids ("storage", type, key, location, numel), tensors as `torch._utils._rebuild_tensor_v2` calls, EDM's
networks as `torch_utils.persistence._reconstruct_persistent_obj(meta)` calls.
"""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from jaxdiff.cli.config_source import load_config
from jaxdiff.errors import ConfigError, JaxdiffError, WeightsError
from jaxdiff.evaluation import inception_weights
from jaxdiff.latent.clip_tokenizer import CLIPTokenizer
from jaxdiff.latent.component_weights import read_autoencoder, read_clip_text
from jaxdiff.latent.stable_diffusion import COMPONENTS
from jaxdiff.latent.word_tokenizer import WordTokenizer
from jaxdiff.readers import edm_pickle
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.weights import torch_pickle
from jaxdiff.weights.files import load_json
from tests.helpers import ROOT

API_PEAK_LIMIT = 64 << 20  # bytes NumPy and Python may allocate while refusing a file (tracemalloc's peak)
CLI_PEAK_LIMIT_MIB = 1024  # the refusing process's peak resident memory; importing jaxdiff takes about 200-350 MiB
SUBPROCESS_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# Runs `python -m jaxdiff.cli ARGS` and prints the peak resident memory of that process (KiB) as its last stdout line.
MEASURED_CLI = (
    "import resource, subprocess, sys; "
    "code = subprocess.run([sys.executable, '-m', 'jaxdiff.cli', *sys.argv[1:]]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


# --------------------------------------------------------------------------- writing pickles by hand


class Global:
    """The global `module.name`, written as pickle's GLOBAL opcode; never called here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("a crafted global is never called while writing")


class Call:
    """Pickles as `func(*args)`."""

    def __init__(self, func: Global, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    """Pickles as the persistent id of a storage: ("storage", torch.<kind>, key, "cpu", numel)."""

    def __init__(self, key: str, numel, kind: str = "FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class CraftPickler(pickle._Pickler):  # the Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_named_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = _save_named_global

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", Global("torch", obj.kind), obj.key, "cpu", obj.numel)
        return None


def dumps(obj, protocol: int = 2) -> bytes:
    out = io.BytesIO()
    CraftPickler(out, protocol).dump(obj)
    return out.getvalue()


REBUILD = Global("torch._utils", "_rebuild_tensor_v2")
RECONSTRUCT = Global("torch_utils.persistence", "_reconstruct_persistent_obj")
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def tensor(storage, size, stride, offset: int = 0) -> Call:
    return Call(REBUILD, storage, offset, tuple(size), tuple(stride), False, None)


def legacy_file(obj, storages: dict[str, np.ndarray], declared: dict[str, int] | None = None) -> bytes:
    """A legacy torch.save stream of `obj` whose storages (float32) are `storages`; `declared` overrides the element
    count the pickle declares."""
    declared = {key: (declared or {}).get(key, values.size) for key, values in storages.items()}
    head = [torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, LEGACY_SYS_INFO, obj, list(storages)]
    raw = [np.int64(v.size).tobytes() + v.astype("<f4").tobytes() for v in storages.values()]
    return b"".join(map(dumps, head)) + b"".join(raw)


def storage_bytes(values, declared: int | None = None) -> Call:
    """`torch.storage._load_from_bytes(b)`, how EDM snapshots hold a storage: `b` a legacy torch.save of it."""
    values = np.asarray(values, np.float32)
    numel = values.size if declared is None else declared
    data = legacy_file(Storage("0", numel), {"0": values}, {"0": numel})
    return Call(Global("torch.storage", "_load_from_bytes"), data)


def torch_zip(path, obj, storages: dict[str, bytes], compression: int = zipfile.ZIP_STORED):
    """A torch.save zip archive: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", dumps(obj))
        archive.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def persistent(class_name: str, **state) -> Call:
    meta = dict(type="class", version=6, module_src="raise SystemExit('EDM code must never run')",
                class_name=class_name, state=state)  # fmt: skip
    return Call(RECONSTRUCT, meta)


def write_snapshot(path, net_kwargs=None, precond_kwargs=None, parameters=None, modules=None):
    """{"ema": EDMPrecond(model=SongUNet(**net_kwargs))} with the network's `parameters` and `modules`."""
    network = persistent("SongUNet", _init_args=(), _init_kwargs=net_kwargs or {}, _parameters=parameters or {},
                         _buffers={}, _modules=modules or {})  # fmt: skip
    ema = persistent("EDMPrecond", _init_args=(), _init_kwargs=precond_kwargs or {}, _parameters={}, _buffers={},
                     _modules={"model": network})  # fmt: skip
    path.write_bytes(dumps({"ema": ema}))
    return path


def nested_snapshot_bytes(depth: int) -> bytes:
    """{"ema": EDMPrecond(model=SongUNet(m=Block(m=Block(...))))} with `depth` Blocks, written as flat protocol-4
    opcodes with memoised strings (no recursive pickler could write it): ~27 bytes a level."""
    memo: dict[str, int] = {}

    def text(value: str) -> bytes:
        if value in memo:
            return b"h" + bytes([memo[value]])  # BINGET
        memo[value] = len(memo) + 1
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE, MEMOIZE

    def opening(class_name: str, child: str | None) -> bytes:
        """reconstruct, {type: class, class_name: NAME, state: {_modules: {CHILD: ... (closed by `closing`)"""
        meta = b"h\x00}(" + text("type") + text("class") + text("class_name") + text(class_name) + text("state")
        return meta + (b"}(" + text("_modules") + b"}(" + text(child) if child else b"}")

    closing = b"uuu\x85R"  # SETITEMS of _modules, state and meta; TUPLE1; REDUCE
    head = b"\x80\x04c" + RECONSTRUCT.module.encode() + b"\n" + RECONSTRUCT.name.encode() + b"\n\x94"
    body = [b"}" + text("ema"), opening("EDMPrecond", "model"), opening("SongUNet", "m")]
    body += [opening("Block", "m")] * (depth - 1) + [opening("Block", None) + b"u\x85R"]
    return head + b"".join(body) + closing * (depth + 1) + b"s."


class _Exploit:
    """Unpickling this runs `touch <marker>`: what a hostile weights file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_torch_file(path, marker):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(w=_Exploit(marker)), protocol=2))
    return path


# --------------------------------------------------------------------------- checking a refusal


def refused(call, error: type[BaseException], *fragments: str, limit: int = API_PEAK_LIMIT) -> str:
    """Run `call()`; assert it raises `error` with a one-line message holding every fragment, allocating at most
    `limit` bytes on the way (tracemalloc: Python objects and NumPy buffers). Returns the message."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as err:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert isinstance(err.value, JaxdiffError)
    assert "\n" not in message and all(fragment in message for fragment in fragments), (fragments, message)
    assert peak < limit, f"{peak / 2**20:.0f} MiB allocated while refusing"
    return message


# --------------------------------------------------------------------------- tensor layouts


def test_a_view_may_repeat_its_storage_a_bounded_number_of_times():
    storage = np.arange(4, dtype=np.float32)
    expanded = torch_pickle.rebuild_tensor(storage, 0, (3, 4), (0, 1))
    np.testing.assert_array_equal(expanded, np.broadcast_to(np.arange(4.0), (3, 4)))
    window = torch_pickle.rebuild_tensor(storage, 1, [2, 2], [1, 1])  # overlapping rows [1, 2], [2, 3]
    np.testing.assert_array_equal(window, [[1.0, 2.0], [2.0, 3.0]])
    limit = torch_pickle.MAX_EXPANSION
    ones = torch_pickle.rebuild_tensor(storage[:1], 0, (limit,), (0,))
    np.testing.assert_array_equal(ones, np.zeros(limit))
    refused(lambda: torch_pickle.rebuild_tensor(storage[:1], 0, (limit + 1,), (0,)), WeightsError,
            f"repeats its storage of 1 elements into {limit + 1}, more than {limit} times")  # fmt: skip
    refused(lambda: torch_pickle.rebuild_tensor(storage, 0, (30000, 30000), (0, 0)), WeightsError,
            "size (30000, 30000), stride (0, 0)", "into 900000000")  # fmt: skip
    empty = torch_pickle.rebuild_tensor(storage, 4, (0, 10**12), (1, 1))  # no elements: nothing to bound
    assert empty.shape == (0, 10**12)


@pytest.mark.parametrize(
    "offset, size, stride, fragment",
    [
        (0, (2, 2), (2, -1), "invalid tensor layout"),
        (-1, (2,), (1,), "invalid tensor layout"),
        (0, (True,), (1,), "invalid tensor layout"),
        (0.0, (2,), (1,), "invalid tensor layout"),
        (0, "22", (1, 1), "invalid tensor layout"),
        (0, (2, 2), (1,), "invalid tensor layout"),
        (0, (1,) * 33, (1,) * 33, "at most 32 dims"),
        (0, (5,), (1,), "exceeds its storage of 4 elements"),
        (3, (2,), (1,), "exceeds its storage of 4 elements"),
        (0, (2, 2), (3, 1), "exceeds its storage of 4 elements"),
    ],
)
def test_tensor_layouts_outside_their_storage_are_refused(offset, size, stride, fragment):
    refused(lambda: torch_pickle.rebuild_tensor(np.arange(4.0), offset, size, stride), WeightsError, fragment)


def test_a_tensor_on_anything_but_a_storage_is_refused():
    refused(lambda: torch_pickle.rebuild_tensor("storage", 0, (1,), (1,)), WeightsError, "built on a str")
    refused(lambda: torch_pickle.rebuild_tensor(np.zeros((2, 2)), 0, (1,), (1,)), WeightsError, "not a storage")


def test_torch_saves_expanded_tensors_with_zero_strides_and_they_read_back(tmp_path, torch):
    """The zero strides the bound allows are those torch.save writes: an expanded tensor keeps its strides."""
    state = {"rows": torch.arange(4.0).expand(3, 4), "fill": torch.tensor(7).expand(2, 3)}
    assert state["rows"].stride() == (0, 1) and state["fill"].stride() == (0, 0)
    torch.save(state, tmp_path / "expanded.pt")
    loaded = torch.load(tmp_path / "expanded.pt")
    assert loaded["rows"].stride() == (0, 1) and loaded["fill"].untyped_storage().nbytes() == 8
    got = torch_pickle.read_torch_file(tmp_path / "expanded.pt")
    np.testing.assert_array_equal(got["rows"], np.broadcast_to(np.arange(4.0, dtype=np.float32), (3, 4)))
    np.testing.assert_array_equal(got["fill"], np.full((2, 3), 7))


# --------------------------------------------------------------------------- PyTorch files


def _zero_stride(path):
    return torch_zip(path, {"w": tensor(Storage("0", 1), (30000, 30000), (0, 0))}, {"0": b"\0" * 4})


def _storage_bytes_short(path):
    return torch_zip(path, {"w": tensor(Storage("0", 10**11), (1,), (1,))}, {"0": b"\0" * 4})


def _legacy_storage_too_large(path):
    path.write_bytes(legacy_file({"w": tensor(Storage("0", 10**12), (1,), (1,))}, {"0": np.zeros(1)},
                                 {"0": 10**12}))  # fmt: skip
    return path


def _one_storage_many_times(path):
    """A 16 KB storage referenced by 10,000 full views (one memoised view, 10,000 keys): 160 MB once copied."""
    view = tensor(Storage("0", 4096), (4096,), (1,))
    return torch_zip(path, {f"w{i}": view for i in range(10000)}, {"0": b"\0" * 4 * 4096})


def _cyclic(path):
    cyclic = {}
    cyclic["self"] = cyclic
    return torch_zip(path, cyclic, {})


def _deep(path):
    """{"d": {"d": ...}} 200,000 deep, as flat protocol-2 opcodes (EMPTY_DICT, BINUNICODE "d", ..., SETITEM)."""
    depth = 200_000
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}" + b"X\x01\x00\x00\x00d}" * depth + b"s" * depth + b".")
    return path


def _deflate_bomb(path):
    zeros = b"\0" * (4 << 20)  # 4 MiB of zeros deflate to about 4 KiB
    return torch_zip(path, {"w": tensor(Storage("0", 1 << 20), (1,), (1,))}, {"0": zeros}, zipfile.ZIP_DEFLATED)


def _allowed_global_misused(path):
    return torch_zip(path, {"w": Call(REBUILD, 1, 2)}, {})


def _bad_persistent_id(path):
    return torch_zip(path, {"w": tensor(Storage("0", "4"), (1,), (1,))}, {"0": b"\0" * 4})


def _not_a_torch_file(path):
    path.write_bytes(b"just some text\n")
    return path


@pytest.mark.parametrize(
    "build, error, fragment",
    [
        (_zero_stride, WeightsError, "size (30000, 30000), stride (0, 0)) repeats its storage of 1 elements"),
        (_storage_bytes_short, WeightsError, "storage '0' holds 4 bytes, but its tensors declare 100000000000"),
        (_legacy_storage_too_large, WeightsError, "its storages declare 4000000000000 bytes, more than its"),
        (_one_storage_many_times, WeightsError, "reading it would build more than 16 times its"),
        (_cyclic, WeightsError, "reading it would build more than 16 times its"),
        (_deep, WeightsError, "containers are nested more than 1000 deep"),
        (_deflate_bomb, WeightsError, "inflates"),
        (_allowed_global_misused, WeightsError, "not a readable PyTorch file (TypeError: rebuild_tensor()"),
        (_bad_persistent_id, torch_pickle.UnsafePickleError, "unexpected persistent id"),
        (_not_a_torch_file, WeightsError, "neither a zip archive nor the legacy format"),
    ],
)
def test_hostile_torch_files_are_refused_in_bounded_memory(tmp_path, build, error, fragment):
    path = build(tmp_path / "weights.pth")
    refused(lambda: torch_pickle.read_torch_file(path), error, f"{path}: ", fragment)


def test_a_tree_of_tensors_in_a_torch_file_is_read_in_order(tmp_path):
    """The non-recursive walk gives the dotted names and values a recursive one would, in the file's order."""
    values = np.arange(6, dtype=np.float32)
    obj = collections.OrderedDict(
        b=tensor(Storage("0", 6), (2, 3), (3, 1)),
        a={"inner": {"x": tensor(Storage("0", 6), (3,), (2,), offset=1)}, 7: tensor(Storage("0", 6), (1,), (1,))},
        skipped=[tensor(Storage("0", 6), (1,), (1,))],
    )
    got = torch_pickle.read_torch_file(torch_zip(tmp_path / "tree.pth", obj, {"0": values.tobytes()}))
    assert list(got) == ["b", "a.inner.x", "a.7"]
    np.testing.assert_array_equal(got["b"], values.reshape(2, 3))
    np.testing.assert_array_equal(got["a.inner.x"], values[1::2])
    np.testing.assert_array_equal(got["a.7"], values[:1])
    assert all(array.flags.writeable and array.flags.owndata for array in got.values())  # copies, not views


# --------------------------------------------------------------------------- EDM snapshots


def _edm_wrong(tmp_path, **net_kwargs):
    return write_snapshot(tmp_path / "network-snapshot-000000.pkl", net_kwargs=net_kwargs)


@pytest.mark.parametrize(
    "net_kwargs, fragment",
    [
        (dict(img_resolution="32"), "SongUNet argument img_resolution='32' is not an int"),
        (dict(img_resolution=32.0), "SongUNet argument img_resolution=32.0 is not an int"),
        (dict(num_blocks=True), "SongUNet argument num_blocks=True is not an int"),
        (dict(channel_mult=["2", 2]), "SongUNet argument channel_mult=['2', 2] is not a list of ints"),
        (dict(attn_resolutions=16), "SongUNet argument attn_resolutions=16 is not a list of ints"),
        (dict(dropout="0.1"), "SongUNet argument dropout='0.1' is not a number"),
        (dict(dropout=float("nan")), "SongUNet argument dropout=nan is not a number"),
        (dict(embedding_type=["fourier"]), "SongUNet argument embedding_type=['fourier'] is not a string"),
        (dict(resample_filter=[1, None]), "SongUNet argument resample_filter=[1, None] is not a list of ints"),
        (dict(colour="red"), "unknown SongUNet arguments ['colour']"),
    ],
)
def test_edm_constructor_arguments_are_type_checked(tmp_path, net_kwargs, fragment):
    path = _edm_wrong(tmp_path, **net_kwargs)
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError, f"{path}: ", fragment)


def test_edm_recorded_arguments_of_the_wrong_kind_are_refused(tmp_path):
    path = write_snapshot(tmp_path / "p.pkl", precond_kwargs={"sigma_data": "0.5"})
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError,
            f"{path}: EDMPrecond argument sigma_data='0.5' is not a number")  # fmt: skip
    network = persistent("SongUNet", _init_args=(), _init_kwargs=[("img_resolution", 32)])
    path.write_bytes(dumps({"ema": persistent("EDMPrecond", _modules={"model": network})}))
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError,
            "SongUNet's recorded arguments are not a tuple and a dict by name (tuple, list)")  # fmt: skip
    network = persistent("SongUNet", _init_args=tuple(range(18)), _init_kwargs={})
    path.write_bytes(dumps({"ema": persistent("EDMPrecond", _modules={"model": network})}))
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError,
            "18 positional SongUNet arguments; it takes 17")  # fmt: skip


def test_an_edm_network_larger_than_its_tensors_is_refused_before_it_is_traced(tmp_path):
    """Arguments of the right types whose network would take unbounded work or memory to trace: the file's own
    tensors bound them."""
    parameters = {f"p{i}": tensor(storage_bytes(np.ones(64)), (64,), (1,)) for i in range(40)}
    cases = [
        (dict(num_blocks=10**6), "make 8000004 UNet blocks, more than its 40 model tensors"),
        (dict(model_channels=2**40), "layers 4398046511104 channels wide"),
        (dict(model_channels=16, resample_filter=[1] * 10**5),
         "layers 64 channels wide and a 100000×100000 resampling filter, larger than its largest model tensor (64"),
    ]
    for net_kwargs, fragment in cases:
        path = write_snapshot(tmp_path / "network-snapshot-1.pkl", net_kwargs, parameters=parameters)
        refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError, fragment)
    # The control: within those bounds the network is traced, and the tensors found not to fit it.
    path = write_snapshot(tmp_path / "network-snapshot-2.pkl", dict(model_channels=16), parameters=parameters)
    with pytest.raises(edm_pickle.EdmPickleError, match="does not fit the model"):
        edm_pickle.read_edm_snapshot(path)


def test_edm_storages_and_views_are_checked_before_they_are_allocated(tmp_path):
    path = write_snapshot(tmp_path / "network-snapshot-1.pkl",
                          parameters={"w": tensor(storage_bytes([1.0]), (30000, 30000), (0, 0))})  # fmt: skip
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError,
            f"{path}: tensor (size (30000, 30000), stride (0, 0)) repeats its storage of 1 elements")  # fmt: skip
    path = write_snapshot(tmp_path / "network-snapshot-2.pkl",
                          parameters={"w": tensor(storage_bytes([1.0], declared=10**12), (1,), (1,))})  # fmt: skip
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError,
            f"{path}: a tensor storage: its storages declare 4000000000000 bytes")  # fmt: skip


def test_deeply_nested_edm_modules_are_refused_without_recursion(tmp_path):
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(nested_snapshot_bytes(200_000))
    # Unpickling builds the 200,000 modules (about 120 MB of Python objects from the 5.4 MB file) before any walk.
    refused(lambda: edm_pickle.read_edm_snapshot(path), WeightsError,
            f"{path}: containers are nested more than 1000 deep", limit=256 << 20)  # fmt: skip
    refused(lambda: Pipeline.from_pretrained(path), WeightsError, "nested more than 1000 deep", limit=256 << 20)
    # The control: the same writer at a shallow depth gives a snapshot that reads up to its missing tensors.
    path.write_bytes(nested_snapshot_bytes(3))
    refused(lambda: edm_pickle.read_edm_snapshot(path), edm_pickle.EdmPickleError, "UNet blocks, more than its 0")


# --------------------------------------------------------------------------- Inception weights


def test_hostile_inception_weights_are_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_torch_file(tmp_path / "evil.pth", marker)
    refused(lambda: inception_weights.load_inception_params(path), torch_pickle.UnsafePickleError,
            f"{path}: refusing to load global", "system")  # fmt: skip
    assert not marker.exists()
    first_conv = {"Conv2d_1a_3x3.conv.weight": tensor(Storage("0", 1), (1,), (1,))}
    misshaped = torch_zip(tmp_path / "misshaped.pth", first_conv, {"0": b"\0" * 4})
    refused(lambda: inception_weights.load_inception_params(misshaped), WeightsError,
            f"{misshaped}: not FID Inception weights: tensor 'Conv2d_1a_3x3.conv.weight' has shape (1,), "
            "expected (32, 3, 3, 3)")  # fmt: skip


def _npz_of_headers(path, shapes: dict[str, tuple[int, ...]], descr: str = "<f4"):
    """An .npz whose members are .npy headers only: a reader that trusted them would allocate their shapes."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, shape in shapes.items():
            member = io.BytesIO()
            np.lib.format.write_array_header_1_0(member, {"descr": descr, "fortran_order": False, "shape": shape})
            archive.writestr(f"{key}.npy", member.getvalue())
    return path


def test_inception_npz_headers_are_checked_before_any_array_is_read(tmp_path):
    shapes = {"/".join(path): shape for path, shape in inception_weights.expected_param_shapes().items()}
    path = _npz_of_headers(tmp_path / "huge.npz", {**shapes, "fc/kernel": (2048, 10**9)})
    refused(lambda: inception_weights.load_inception_params(path), WeightsError,
            f"{path}: param fc/kernel has shape (2048, 1000000000), expected (2048, 1008)")  # fmt: skip
    path = _npz_of_headers(tmp_path / "objects.npz", {"fc/kernel": (2048, 1008)}, descr="|O")
    refused(lambda: inception_weights.load_npz(path), WeightsError,
            f"{path}: array 'fc/kernel' has dtype object; only float arrays are read")  # fmt: skip
    path = _npz_of_headers(tmp_path / "truncated.npz", shapes)  # the right headers, then no data
    refused(lambda: inception_weights.load_npz(path), WeightsError, f"{path}: not a readable .npz file")
    (tmp_path / "text.npz").write_text("not an archive")
    refused(lambda: inception_weights.load_npz(tmp_path / "text.npz"), WeightsError, "text.npz: not an .npz archive")


# --------------------------------------------------------------------------- config and settings files


@pytest.mark.parametrize(
    "source, fragment",
    [
        ('def get_config():\n    raise RuntimeError("no GPU")\n', "running it raised RuntimeError: no GPU"),
        ('raise KeyError("at import")\n', "running it raised KeyError: 'at import'"),
        ("import sys\nsys.exit(3)\n", "running it raised SystemExit: 3"),
        ("def get_config(:\n", "running it raised SyntaxError: invalid syntax"),
        ("config = {}\n", "it defines no get_config()"),
        ("def get_config():\n    return [1]\n", "get_config() returned list, not a ConfigDict"),
    ],
)
def test_a_config_file_that_fails_is_a_config_error_naming_it(tmp_path, source, fragment):
    path = tmp_path / "my_config.py"
    path.write_text(source)
    refused(lambda: load_config(str(path), []), ConfigError, str(path), fragment)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2]", "must hold a JSON object, got list"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON: nested too deeply"),
        ("{\"a\": " + "9" * 5000 + "}", "is not valid JSON: Exceeds the limit"),
        (b"{\"a\": \"\xff\"}", "is not valid JSON: 'utf-8' codec can't decode"),
        ("{\"a\": ", "is not valid JSON: Expecting value"),
    ],
)
def test_settings_files_that_are_no_json_object_are_refused_naming_them(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(lambda: load_json(path), WeightsError, str(path), fragment)


def test_every_json_settings_file_of_a_folder_is_refused_in_one_line(tmp_path):
    vae, text, tokenizer = (tmp_path / name for name in ("vae", "text_encoder", "tokenizer"))
    for folder in (vae, text, tokenizer):
        folder.mkdir()
    (vae / "config.json").write_text("[1, 2, 3]")
    refused(lambda: read_autoencoder(tmp_path), WeightsError, str(vae / "config.json"), "got list")
    clip = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32)  # fmt: skip
    (text / "config.json").write_text(json.dumps({**clip, "hidden_act": ["gelu"]}))
    refused(lambda: read_clip_text(tmp_path), WeightsError, f"{text / 'config.json'}: unhashable type: 'list'")
    (tokenizer / "tokenizer_config.json").write_text('"a string"')
    refused(lambda: CLIPTokenizer.from_folder(tokenizer), WeightsError, "tokenizer_config.json", "got str")
    (tokenizer / "tokenizer_config.json").unlink()
    (tokenizer / "tokenizer.json").write_text(json.dumps({"hello": "world"}))
    refused(lambda: CLIPTokenizer.from_folder(tokenizer), WeightsError,
            f"{tokenizer / 'tokenizer.json'} is not a tokenizer.json")  # fmt: skip
    refused(lambda: WordTokenizer.from_json("[" * 100_000 + "]" * 100_000), WeightsError, "nested too deeply")


def test_a_unet_config_holding_a_json_array_is_refused_by_the_api(tmp_path):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("[1, 2, 3]")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    refused(lambda: Pipeline.from_pretrained(tmp_path / "model"), WeightsError, str(unet / "config.json"),
            "must hold a JSON object, got list")  # fmt: skip


# --------------------------------------------------------------------------- the command line


def _cli_edm_zero_stride(tmp_path):
    path = write_snapshot(tmp_path / "network-snapshot-000000.pkl",
                          parameters={"w": tensor(storage_bytes([1.0]), (30000, 30000), (0, 0))})  # fmt: skip
    out = tmp_path / "out"
    return ["convert", str(path), str(out)], {}, [str(path), "repeats its storage of 1 elements"], [out]


def _cli_edm_nested(tmp_path):
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(nested_snapshot_bytes(200_000))
    out = tmp_path / "out"
    return ["convert", str(path), str(out)], {}, [str(path), "containers are nested more than 1000 deep"], [out]


def _cli_edm_wrong_type(tmp_path):
    path = _edm_wrong(tmp_path, img_resolution="32")
    out = tmp_path / "out"
    return ["convert", str(path), str(out)], {}, [str(path), "img_resolution='32' is not an int"], [out]


def _cli_inception(tmp_path, given: str):
    path = malicious_torch_file(tmp_path / "evil.pth", tmp_path / "pwned")
    argv = ["eval", "stats", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]
    argv += ["--inception-weights", str(path)] if given == "flag" else []
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), **({"JAXDIFF_INCEPTION_WEIGHTS": str(path)} if given == "env"
                                                         else {})}  # fmt: skip
    never_created = [tmp_path / "pwned", tmp_path / "data", tmp_path / "cache"]
    return argv, env, [str(path), "refusing to load global"], never_created


def _cli_config_raises(tmp_path):
    path = tmp_path / "raising.py"
    path.write_text('def get_config():\n    raise RuntimeError("no such GPU")\n')
    workdir = tmp_path / "run"
    argv = ["train", "--config", str(path), "--workdir", str(workdir)]
    return argv, {}, [str(path), "running it raised RuntimeError: no such GPU"], [workdir]


def _cli_unet_config_array(tmp_path):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("[1, 2, 3]")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["convert", str(tmp_path / "model"), str(out)]
    return argv, {}, [str(unet / "config.json"), "must hold a JSON object, got list"], [out]


def _cli_tokenizer_json(tmp_path):
    """A Stable Diffusion folder read up to its tokenizer, whose tokenizer.json is JSON but no tokenizer."""
    folder = tmp_path / "sd"
    for component in COMPONENTS:
        (folder / component).mkdir(parents=True)
    settings = {"model_index.json": {"_class_name": "StableDiffusionPipeline"}, "tokenizer/tokenizer.json": {"a": 1},
                "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler"}}  # fmt: skip
    for name, content in settings.items():
        (folder / name).write_text(json.dumps(content))
    out = tmp_path / "grid.png"
    argv = ["sample", "--pretrained", str(folder), "--prompt", "a cat", "--out", str(out)]
    return argv, {}, [str(folder / "tokenizer" / "tokenizer.json"), "is not a tokenizer.json"], [out]


CLI_CASES = {
    "edm_zero_stride": _cli_edm_zero_stride,
    "edm_200000_nested_modules": _cli_edm_nested,
    "edm_wrong_type": _cli_edm_wrong_type,
    "inception_flag": lambda tmp_path: _cli_inception(tmp_path, "flag"),
    "inception_env": lambda tmp_path: _cli_inception(tmp_path, "env"),
    "config_file_raises": _cli_config_raises,
    "unet_config_array": _cli_unet_config_array,
    "tokenizer_json": _cli_tokenizer_json,
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_command_answers_a_hostile_file_in_one_line_in_bounded_memory(tmp_path, case):
    argv, env, fragments, never_created = CLI_CASES[case](tmp_path)
    proc = subprocess.run([sys.executable, "-c", MEASURED_CLI, *argv], capture_output=True, text=True, timeout=150,
                          env={**SUBPROCESS_ENV, **env}, cwd=ROOT)  # fmt: skip
    peak_mib = int(proc.stdout.splitlines()[-1]) / 1024
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("jaxdiff: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "this is a bug" not in proc.stderr
    assert all(fragment in lines[0] for fragment in fragments), (fragments, lines[0])
    assert peak_mib < CLI_PEAK_LIMIT_MIB, f"peak resident memory {peak_mib:.0f} MiB"
    assert not [path for path in never_created if path.exists()]
    print(f"{case}: exit {proc.returncode}, peak {peak_mib:.0f} MiB: {lines[0]}")


def test_the_memory_measure_sees_a_child_that_allocates():
    """The control of the measure above: a child touching 300 MiB is reported above that."""
    child = "import numpy as np; np.ones(300 << 20, np.uint8)"
    measure = MEASURED_CLI.replace("'-m', 'jaxdiff.cli', *sys.argv[1:]", "'-c', sys.argv[1]")
    proc = subprocess.run([sys.executable, "-c", measure, child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.splitlines()[-1]) / 1024 > 300
