"""The captioned image folder source: pixels against NumPy crops of what Pillow wrote, captions from
captions.jsonl or .txt files, batches through the pipeline and load_dataset, and each bad input's error."""

import json

import numpy as np
import PIL.Image
import pytest

from jaxdiff import data
from jaxdiff.config import default_config
from jaxdiff.data import load_folder

SIZE = 8
CAPTIONS = {
    "a.jpg": "a red fox, JPEG",
    "b.png": "blue square",
    "c.PNG": "grey gradient 🌫",
    "d.png": "with alpha",
    "e.png": "rotated by its EXIF tag",
}
EXIF_ORIENTATION = 0x0112


def rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def lanczos(square: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(square).resize((size, size), PIL.Image.Resampling.LANCZOS))


def write_images(folder) -> dict[str, np.ndarray]:
    """Five images of several modes and shapes, plus files the source skips; returns the expected [8, 8, 3] pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    expected = {}

    wide = rgb(rng, 8, 14)  # JPEG: compare with Pillow's decoding of the file, cropped to columns 3..10
    PIL.Image.fromarray(wide).save(folder / "a.jpg", quality=95)
    expected["a.jpg"] = np.asarray(PIL.Image.open(folder / "a.jpg").convert("RGB"))[:, 3:11]

    square = rgb(rng, 8, 8)
    PIL.Image.fromarray(square).save(folder / "b.png")
    expected["b.png"] = square

    grey = rng.integers(0, 256, (16, 10), dtype=np.uint8)  # tall: rows 3..12, then resized 10 -> 8
    PIL.Image.fromarray(grey, mode="L").save(folder / "c.PNG")
    expected["c.PNG"] = lanczos(np.repeat(grey[3:13, :, None], 3, axis=2), SIZE)

    rgba = np.concatenate([rgb(rng, 8, 8), rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)], axis=2)
    PIL.Image.fromarray(rgba, mode="RGBA").save(folder / "d.png")
    expected["d.png"] = rgba[..., :3]

    stored = rgb(rng, 8, 12)  # EXIF orientation 6: shown turned 90° clockwise, 12 high and 8 wide
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    PIL.Image.fromarray(stored).save(folder / "e.png", exif=exif)
    expected["e.png"] = np.rot90(stored, k=-1)[2:10]

    (folder / "notes.md").write_text("not an image")
    PIL.Image.fromarray(square).save(folder / ".hidden.png")
    (folder / "sub").mkdir()
    PIL.Image.fromarray(square).save(folder / "sub" / "f.png")
    return expected


def write_jsonl(folder, captions=CAPTIONS, extra_lines=()):
    """One line per caption in reverse file order, a blank third line, then `extra_lines` (str or bytes)."""
    lines = [json.dumps({"file": name, "text": text}).encode() for name, text in reversed(list(captions.items()))]
    lines.insert(2, b"")
    extra = [line if isinstance(line, bytes) else line.encode() for line in extra_lines]
    (folder / "captions.jsonl").write_bytes(b"\n".join([*lines, *extra]) + b"\n")


def write_text_files(folder, captions=CAPTIONS):
    for name, text in captions.items():
        (folder / f"{name.rsplit('.', 1)[0]}.txt").write_text(f"  {text}\n", encoding="utf-8")


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
def test_images_and_captions_in_sorted_file_order(tmp_path, layout):
    expected = write_images(tmp_path)
    (write_jsonl if layout == "jsonl" else write_text_files)(tmp_path)
    source = load_folder(str(tmp_path), SIZE)
    names = sorted(CAPTIONS)
    assert source.files == tuple(names) and source.num_examples == 5
    assert source.image_shape == (SIZE, SIZE, 3) and source.num_classes == 0
    order = np.array([4, 0, 2, 2, 1, 3])
    images, labels = source.get(order)
    assert images.dtype == np.uint8 and images.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(labels, np.zeros(6, np.int32))
    for row, index in enumerate(order):
        np.testing.assert_array_equal(images[row], expected[names[index]], err_msg=names[index])
    assert source.captions(order).tolist() == [CAPTIONS[names[i]] for i in order]


def test_pipeline_batches_and_load_dataset(tmp_path):
    expected = write_images(tmp_path)
    write_jsonl(tmp_path)
    config = default_config()
    config.data.dataset, config.data.data_dir = "folder", str(tmp_path)
    source = data.load_dataset(config.data, image_size=SIZE)
    batch = data.batch_for_step(source, seed=1, step=3, global_batch_size=4, process_index=0, process_count=1)
    names = sorted(CAPTIONS)
    for image, caption in zip(batch["image"], batch["caption"]):
        name = next(n for n in names if CAPTIONS[n] == caption)
        np.testing.assert_array_equal(image, expected[name])
    with pytest.raises(ValueError, match="needs image_size"):
        data.load_dataset(config.data)
    config.data.data_dir = ""
    with pytest.raises(ValueError, match="needs data.data_dir"):
        data.load_dataset(config.data, image_size=SIZE)


def test_missing_folder_and_folder_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(str(tmp_path / "nowhere"), SIZE)
    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match="has no images"):
        load_folder(str(tmp_path), SIZE)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_folder(str(tmp_path), 0)


def test_an_image_without_caption_is_named(tmp_path):
    write_images(tmp_path)
    write_text_files(tmp_path, {k: v for k, v in CAPTIONS.items() if k != "c.PNG"})
    with pytest.raises(ValueError, match=r"image 'c.PNG' .* has no caption: add c.txt"):
        load_folder(str(tmp_path), SIZE)
    write_jsonl(tmp_path, {k: v for k, v in CAPTIONS.items() if k != "d.png"})
    with pytest.raises(ValueError, match=r"image 'd.png' .* has no caption in captions.jsonl \(1 images lack one\)"):
        load_folder(str(tmp_path), SIZE)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"file": "a.jpg", "text": ', r"captions.jsonl:7: not valid JSON"),
        ('["a.jpg", "text"]', r"captions.jsonl:7: expected \{\"file\""),
        ('{"file": "a.jpg", "text": 3}', r"captions.jsonl:7: expected \{\"file\""),
        ('{"file": "zz.png", "text": "x"}', r"captions.jsonl:7: 'zz.png' is not an image"),
        ('{"file": "b.png", "text": "again"}', r"captions.jsonl:7: 'b.png' already has a caption on line 5"),
        (b'{"file": "a.jpg", "text": "\xff"}', r"captions.jsonl:7: not UTF-8 text"),
    ],
)
def test_bad_caption_lines_name_file_and_line(tmp_path, line, message):
    write_images(tmp_path)
    write_jsonl(tmp_path, extra_lines=[line])
    with pytest.raises(ValueError, match=message):
        load_folder(str(tmp_path), SIZE)


def test_unreadable_images_are_named_at_load(tmp_path):
    write_images(tmp_path)
    write_jsonl(tmp_path)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"b.png: not a readable PNG or JPEG image"):
        load_folder(str(tmp_path), SIZE)
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "b.png", format="GIF")
    with pytest.raises(ValueError, match=r"b.png: holds a GIF image"):
        load_folder(str(tmp_path), SIZE)


def test_images_decode_lazily_and_a_truncated_one_is_named_when_read(tmp_path):
    write_images(tmp_path)
    write_jsonl(tmp_path)
    jpeg = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(jpeg[: jpeg.index(b"\xff\xda") + 40])  # headers intact, scan cut short
    source = load_folder(str(tmp_path), SIZE)
    assert source.get(np.array([1]))[0].shape == (1, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r"a.jpg: cannot decode the image"):
        source.get(np.array([1, 0]))
