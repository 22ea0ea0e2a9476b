"""A model's weights as one safetensors file or as shards listed by an index, as transformers and diffusers write
models over their shard size: `<stem>.safetensors.index[.<variant>].json` holding {"weight_map": {tensor name:
shard file name}} beside the shards (stem "model" for transformers, "diffusion_pytorch_model" for diffusers)."""

from __future__ import annotations

import pathlib

from jaxdiff.errors import MissingWeightsError, WeightsError
from jaxdiff.weights.files import load_json, weights_file
from jaxdiff.weights.matching import MAX_LISTED
from jaxdiff.weights.safetensors_reader import open_safetensors


def index_file(folder: pathlib.Path, stem: str, variant: str | None = None) -> pathlib.Path:
    """The shard index of `stem` and `variant` in `folder` (it may not exist)."""
    return folder / f"{stem}.safetensors.index{'' if variant is None else '.' + variant}.json"


def weight_shards(
    folder: pathlib.Path, stem: str, variant: str | None = None
) -> tuple[list[pathlib.Path], dict[str, str], pathlib.Path]:
    """(the safetensors files holding the weights, the index's tensor -> file map, the file errors name): the shards
    the index names when there is one, else the one weights file (`weights_file`) with an empty map. A malformed
    index, a shard name that is not a plain file name, or a shard that is not there: one error naming the index."""
    index = index_file(folder, stem, variant)
    if not index.is_file():
        file = weights_file(folder, stem, variant)
        return [file], {}, file
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: weight_map must be an object of tensor name -> shard file name")
    names = sorted(set(weight_map.values()))
    bad = [name for name in names if pathlib.PurePath(name).name != name or name in (".", "..")]
    if bad:
        raise WeightsError(f"{index}: shard names {bad} must be file names in {folder}")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise MissingWeightsError(f"{index} names shards {missing} that are not in {folder}")
    return [folder / name for name in names], weight_map, index


def tensor_locations(
    files: list[pathlib.Path], weight_map: dict[str, str], source: pathlib.Path
) -> tuple[dict[str, pathlib.Path], dict[str, tuple[int, ...]]]:
    """(tensor name -> the file holding it, tensor name -> its shape) over `files` (`weight_shards`' result), read
    from the headers only. One WeightsError naming `source` lists every tensor held by two files, held by another
    shard than the index names, or named by the index and held by none."""
    location, shapes, misplaced = {}, {}, []
    for file in files:
        with open_safetensors(file) as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle)
                if name in location:
                    misplaced.append(f"{name} in both {location[name].name} and {file.name}")
                elif weight_map and weight_map.get(name) != file.name:
                    misplaced.append(f"{name} in {file.name}, index: {weight_map.get(name)}")
                location[name] = file
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    misplaced += [f"{name} in no shard, index: {file}" for name, file in weight_map.items() if name not in location]
    if misplaced:
        shown = sorted(misplaced)[:MAX_LISTED]
        more = f" and {len(misplaced) - len(shown)} more" if len(misplaced) > len(shown) else ""
        raise WeightsError(f"{source}: {len(misplaced)} tensors not where the index says: {shown}{more}")
    return location, shapes
