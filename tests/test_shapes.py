"""The `shapes` dataset (drawing against a float64 reference of its documented rules, determinism, held-out
combinations, the checker, the source and pipeline batches) and the word-level caption tokenizer."""

import itertools
import json
import re

import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.config import default_config
from jaxdiff.data import shapes
from jaxdiff.models.clip_text import LEGACY_EOS_TOKEN_ID
from jaxdiff.latent.word_tokenizer import WordTokenizer

SHAPE_NAMES = ["circle", "square", "triangle"]
COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
SIZE_NAMES = ["small", "large"]
POSITION_NAMES = ["top left", "top right", "bottom left", "bottom right"]
HELDOUT = {
    ("red", "square", "top right"), ("green", "circle", "bottom left"), ("blue", "triangle", "bottom right"),
    ("yellow", "triangle", "top left"), ("magenta", "square", "bottom left"), ("magenta", "circle", "bottom right"),
    ("cyan", "circle", "top left"), ("white", "triangle", "top right"),
}  # fmt: skip
CAPTION = re.compile(
    r"a (small|large) (red|green|blue|yellow|magenta|cyan|white) (circle|square|triangle) "
    r"in the (top left|top right|bottom left|bottom right)"
)
MASK64 = (1 << 64) - 1


def splitmix64(x):
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def reference_example(seed, index, split):
    """(image uint8 [32, 32, 3], caption) from the module docstring's rules, in Python ints and float64."""
    key = splitmix64(seed * 2**32 + index)
    words = [splitmix64((key + k * 0x9E3779B97F4A7C15) & MASK64) for k in range(1, 10)]
    combos = [
        (c, s, p)
        for c, s, p in itertools.product(COLOUR_NAMES, SHAPE_NAMES, POSITION_NAMES)
        if ((c, s, p) in HELDOUT) == (split == "heldout")
    ]
    choice = words[0] % (2 * len(combos))
    colour, shape, position = combos[choice // 2]
    size = SIZE_NAMES[choice % 2]
    u = [(w >> 11) / 2.0**53 for w in words[1:]]
    centre_row = (8 if position.startswith("top") else 24) + (2 * u[0] - 1)
    centre_col = (8 if position.endswith("left") else 24) + (2 * u[1] - 1)
    r = (3.0 if size == "small" else 6.0) * (1 + 0.1 * (2 * u[2] - 1))
    on = np.array({"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "yellow": [1, 1, 0],
                   "magenta": [1, 0, 1], "cyan": [0, 1, 1], "white": [1, 1, 1]}[colour], np.float64)  # fmt: skip
    foreground = on * (0.75 + 0.25 * u[3]) + (1 - on) * 0.15 * u[4]
    background = 0.12 * np.array(u[5:8])
    y, x = np.meshgrid(np.arange(32) + 0.5 - centre_row, np.arange(32) + 0.5 - centre_col, indexing="ij")
    if shape == "circle":
        distance = np.hypot(x, y) - r
    elif shape == "square":
        distance = np.maximum(np.abs(x), np.abs(y)) - r
    else:  # apex (0, -r), base corners (±r, r): the base edge and the two slanted edges
        distance = np.maximum(y - r, (2 * np.abs(x) - y - r) / np.sqrt(5))
    coverage = np.clip(0.5 - distance, 0, 1)[..., None]
    image = np.floor((background + coverage * (foreground - background)) * 255 + 0.5).astype(np.uint8)
    return image, f"a {size} {colour} {shape} in the {position}"


def attributes_of(captions):
    """Attribute indices {"shape", "colour", "size", "position"} parsed from captions."""
    parsed = [CAPTION.fullmatch(c).groups() for c in captions]
    size, colour, shape, position = zip(*parsed)
    return {
        "shape": np.array([SHAPE_NAMES.index(s) for s in shape]),
        "colour": np.array([COLOUR_NAMES.index(c) for c in colour]),
        "size": np.array([SIZE_NAMES.index(s) for s in size]),
        "position": np.array([POSITION_NAMES.index(p) for p in position]),
    }


# --- drawing -------------------------------------------------------------------------------------


def test_public_names_and_heldout_combinations():
    assert (list(shapes.SHAPES), list(shapes.COLOURS)) == (SHAPE_NAMES, COLOUR_NAMES)
    assert (list(shapes.SIZES), list(shapes.POSITIONS)) == (SIZE_NAMES, POSITION_NAMES)
    assert set(shapes.HELDOUT_COMBINATIONS) == HELDOUT and len(shapes.HELDOUT_COMBINATIONS) == 8


@pytest.mark.parametrize("seed, split", [(0, "train"), (7, "train"), (3, "heldout")])
def test_draw_shapes_matches_a_float64_reference_of_the_documented_rules(seed, split):
    start = 1000
    images, captions = data.draw_shapes(12, seed=seed, split=split, start=start)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    for row in range(12):
        expected_image, expected_caption = reference_example(seed, start + row, split)
        assert captions[row] == expected_caption
        difference = np.abs(images[row].astype(int) - expected_image.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (row, difference.max())


def test_each_example_depends_only_on_seed_and_index():
    images, captions = data.draw_shapes(300, seed=5)
    again_images, again_captions = data.draw_shapes(300, seed=5)
    np.testing.assert_array_equal(images, again_images)
    assert captions == again_captions
    slice_images, slice_captions = data.draw_shapes(20, seed=5, start=137)
    np.testing.assert_array_equal(slice_images, images[137:157])
    assert slice_captions == captions[137:157]
    scattered = np.array([299, 3, 150, 3])
    picked_images, picked_captions = shapes.draw_examples(scattered, seed=5)
    np.testing.assert_array_equal(picked_images, images[scattered])
    assert picked_captions == [captions[i] for i in scattered]
    assert shapes.shape_captions(scattered, seed=5) == picked_captions
    other_images, other_captions = data.draw_shapes(300, seed=6)
    assert (other_images != images).any(axis=(1, 2, 3)).all()
    assert np.mean([a != b for a, b in zip(captions, other_captions)]) > 0.9


def test_train_never_draws_a_heldout_combination_and_heldout_draws_only_those():
    train = attributes_of(shapes.shape_captions(np.arange(20_000), seed=0, split="train"))
    seen = {(COLOUR_NAMES[c], SHAPE_NAMES[s], POSITION_NAMES[p])
            for c, s, p in zip(train["colour"], train["shape"], train["position"])}  # fmt: skip
    assert not seen & HELDOUT
    assert len(seen) == 84 - 8
    assert set(train["size"]) == {0, 1}
    heldout = attributes_of(shapes.shape_captions(np.arange(2_000), seed=0, split="heldout"))
    drawn = {(COLOUR_NAMES[c], SHAPE_NAMES[s], POSITION_NAMES[p])
             for c, s, p in zip(heldout["colour"], heldout["shape"], heldout["position"])}  # fmt: skip
    assert drawn == HELDOUT
    assert 0.45 < heldout["size"].mean() < 0.55


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.draw_shapes(4, split="test"), "split='test' is not one of"),
        (lambda: data.draw_shapes(4, seed=-1), "seed must be an int in [0, 2**31), got -1"),
        (lambda: data.draw_shapes(4, seed=1.5), "seed must be an int"),
        (lambda: data.draw_shapes(-2), "n must be an int >= 0, got -2"),
        (lambda: data.draw_shapes(4, start=-1), "start must be an int >= 0, got -1"),
        (lambda: data.draw_shapes(4, start=2**32 - 2), "exceeds the 2**32 examples"),
        (lambda: shapes.draw_examples(np.array([0.5])), "indices must be a 1-D integer array"),
        (lambda: data.read_attributes(np.zeros((2, 32, 32, 3), np.float32)), "must be uint8 [n, 32, 32, 3]"),
        (lambda: data.read_attributes(np.zeros((2, 16, 16, 3), np.uint8)), "must be uint8 [n, 32, 32, 3]"),
        (lambda: shapes.ShapesSource("test"), "split='test' is not one of ('train', 'heldout')"),
        (lambda: shapes.ShapesSource(num_examples=0), "num_examples must be in [1, 2**32], got 0"),
    ],
)
def test_bad_input_is_refused_naming_the_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# --- the checker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split, count", [("train", 5_000), ("heldout", 1_000)])
def test_read_attributes_agrees_with_the_captions(split, count):
    images, captions = data.draw_shapes(count, seed=1, split=split)
    expected = attributes_of(captions)
    got = data.read_attributes(images)
    for name in ("shape", "colour", "size", "position"):
        agreement = np.mean(got[name] == expected[name])
        assert agreement >= 0.99, (name, agreement)


def test_read_attributes_reads_a_hand_made_image():
    """A 10×10 yellow square (area 100 > 50: large) at rows 18..27, columns 3..12 on black: bottom left."""
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 18:28, 3:13] = (230, 220, 10)
    got = data.read_attributes(image)
    assert {k: int(v[0]) for k, v in got.items()} == {
        "shape": SHAPE_NAMES.index("square"), "colour": COLOUR_NAMES.index("yellow"),
        "size": SIZE_NAMES.index("large"), "position": POSITION_NAMES.index("bottom left"),
    }  # fmt: skip



def test_coverage_maps_are_the_largest_channel_rise_over_the_background_scaled_to_the_brightest():
    """Background (20, 30, 10) everywhere; pixel (5, 6) rises by (200, 0, 0), pixels (7, 8) by (0, 100, 50)."""
    image = np.empty((1, 32, 32, 3), np.uint8)
    image[:] = (20, 30, 10)
    image[0, 5, 6] = (220, 30, 10)
    image[0, 7, 8] = (20, 130, 60)
    expected = np.zeros((1, 32, 32), np.float64)
    expected[0, 5, 6], expected[0, 7, 8] = 1.0, 100 / 200
    np.testing.assert_allclose(data.shapes.coverage_maps(image), expected, atol=1e-7)

# --- the source and the pipeline -----------------------------------------------------------------


def shapes_config(split):
    config = default_config()
    config.data.dataset, config.data.split = "shapes", split
    return config.data


def test_load_dataset_gives_the_shapes_source():
    source = data.load_dataset(shapes_config("train"))
    assert (source.name, source.num_examples, source.num_classes) == ("shapes", 50_000, 0)
    assert source.image_shape == (32, 32, 3)
    indices = np.array([49_999, 0, 1234])
    images, labels = source.get(indices)
    expected_images, expected_captions = shapes.draw_examples(indices, seed=0, split="train")
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, np.zeros(3, np.int32))
    assert source.captions(indices).tolist() == expected_captions
    assert data.load_dataset(shapes_config("heldout")).num_examples == 5_000
    with pytest.raises(ValueError, match=re.escape("index 50000 is outside [0, 50000)")):
        source.get(np.array([50_000]))
    with pytest.raises(ValueError, match=re.escape("shapes has the splits ('train', 'heldout'), got split='test'")):
        data.load_dataset(shapes_config("test"))


def test_pipeline_batches_carry_images_labels_and_captions():
    source = data.load_dataset(shapes_config("heldout"))
    step, batch_size = 3, 8
    batch = data.batch_for_step(
        source, seed=2, step=step, global_batch_size=batch_size, process_index=1, process_count=2
    )  # fmt: skip
    start = step * batch_size + batch_size // 2  # process 1 of 2 takes the second half
    indices = data.example_indices(source.num_examples, seed=2, start=start, stop=(step + 1) * batch_size)
    expected_images, expected_captions = shapes.draw_examples(indices, seed=0, split="heldout")
    assert set(batch) == {"image", "label", "caption"}
    np.testing.assert_array_equal(batch["image"], expected_images)
    assert batch["caption"].tolist() == expected_captions
    with data.iterate_batches(
        source, seed=2, start_step=step, global_batch_size=batch_size, process_index=1, process_count=2
    ) as batches:  # fmt: skip
        first = next(batches)
    np.testing.assert_array_equal(first["image"], batch["image"])
    assert first["caption"].tolist() == expected_captions
    tokenizer = WordTokenizer.from_captions(all_captions())
    assert [tokenizer.decode(row) for row in tokenizer.encode(first["caption"]).input_ids] == expected_captions
    digits_like = data.batch_for_step(
        data.SyntheticSource(10, (2, 2, 1)), seed=0, step=0, global_batch_size=2, process_index=0, process_count=1
    )  # fmt: skip
    assert set(digits_like) == {"image", "label"}


# --- the word tokenizer --------------------------------------------------------------------------

SHAPES_WORDS = sorted({"a", "in", "the", "small", "large", "circle", "square", "triangle", "top", "bottom",
                       "left", "right", *COLOUR_NAMES})  # fmt: skip


def all_captions():
    return [f"a {z} {c} {s} in the {p}" for z, c, s, p in
            itertools.product(SIZE_NAMES, COLOUR_NAMES, SHAPE_NAMES, POSITION_NAMES)]  # fmt: skip


def test_vocabulary_is_special_tokens_then_sorted_words():
    tokenizer = WordTokenizer.from_captions(shapes.shape_captions(np.arange(2_000)))
    assert tokenizer.tokens == ("<pad>", "<unk>", "<start>", "<end>", *SHAPES_WORDS)
    assert tokenizer.vocab_size == 4 + 19 and tokenizer.max_length == 16
    assert 3 != LEGACY_EOS_TOKEN_ID  # the end id must not make CLIP text models pool at the largest id


def test_encode_pads_like_clip_and_decodes_back():
    tokenizer = WordTokenizer.from_captions(all_captions(), max_length=10)
    ids, mask = tokenizer.encode(["a small blue triangle in the bottom right", ""])
    word = {w: 4 + i for i, w in enumerate(SHAPES_WORDS)}
    expected = [2] + [word[w] for w in "a small blue triangle in the bottom right".split()] + [3]
    np.testing.assert_array_equal(ids[0], expected)
    np.testing.assert_array_equal(mask[0], [1] * 10)
    np.testing.assert_array_equal(ids[1], [2, 3] + [0] * 8)
    np.testing.assert_array_equal(mask[1], [1, 1] + [0] * 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    captions = all_captions()
    assert [tokenizer.decode(row) for row in tokenizer.encode(captions).input_ids] == captions
    np.testing.assert_array_equal(tokenizer.encode("A  Large\tRED circle").input_ids,
                                  tokenizer.encode(["a large red circle"]).input_ids)  # fmt: skip


def test_vocabulary_is_deterministic_and_survives_json():
    captions = all_captions()
    tokenizer = WordTokenizer.from_captions(captions)
    shuffled = WordTokenizer.from_captions([captions[i] for i in np.random.default_rng(0).permutation(len(captions))])
    assert tokenizer.to_json() == shuffled.to_json()
    restored = WordTokenizer.from_json(tokenizer.to_json())
    saved = {"format": "jaxdiff.latent.word_tokenizer", "max_length": 16, "words": SHAPES_WORDS}
    assert json.loads(restored.to_json()) == saved
    for a, b in zip(restored.encode(captions), tokenizer.encode(captions)):
        np.testing.assert_array_equal(a, b)


def test_unknown_words_raise_naming_them_or_become_unk():
    tokenizer = WordTokenizer.from_captions(all_captions(), max_length=8)
    with pytest.raises(ValueError, match=re.escape("words outside the vocabulary: ['hexagon', 'purple']")):
        tokenizer.encode(["a purple hexagon", "a red circle"])
    ids, mask = tokenizer.encode("a purple hexagon", unknown="unk")
    np.testing.assert_array_equal(ids[0], [2, 4, 1, 1, 3, 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 0, 0, 0])
    assert tokenizer.decode(ids[0]) == "a <unk> <unk>"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.encode("a red circle", unknown="skip"), "unknown='skip' is not one of ('error', 'unk')"),
        (lambda t: t.encode("a small red circle in the top left"), "longer than max_length - 2 = 6 words"),
        (lambda t: t.encode(["a", 3]), "prompts must be a string or a list of strings"),
        (lambda t: t.decode([2, 99]), "token ids [99] are outside [0, 23)"),
        (lambda t: WordTokenizer.from_captions([]), "captions is empty"),
        (lambda t: WordTokenizer.from_captions(["a b"], max_length=1), "max_length=1 must be an int >= 2"),
        (lambda t: WordTokenizer.from_captions(["a <end>"]), "not ('<pad>', '<unk>', '<start>', '<end>'): ['<end>']"),
        (lambda t: WordTokenizer(["b", "a"], max_length=4), "must be unique and sorted"),
        (lambda t: WordTokenizer.from_json("{"), "is not valid JSON"),
        (lambda t: WordTokenizer.from_json('{"words": []}'), "must be an object with keys"),
    ],
)
def test_tokenizer_bad_input(call, message):
    tokenizer = WordTokenizer.from_captions(all_captions(), max_length=8)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(tokenizer)
