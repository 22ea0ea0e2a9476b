"""CLIP's byte-level BPE tokenizer, as Stable Diffusion pipelines call it, built on the `tokenizers` library.

A `tokenizer/` folder holds `vocab.json` + `merges.txt` (or `tokenizer.json`), and the special tokens in
`special_tokens_map.json` / `tokenizer_config.json`. Text is NFC-normalised, runs of whitespace become one
space, and it is lowercased; it is split into words, letters runs, single digits and punctuation runs
(CLIP's pattern), mapped to byte-level symbols and merged by BPE with the word-end suffix `</w>`.
Every prompt becomes exactly `model_max_length` (77) ids: BOS, at most 75 tokens, EOS, then the pad id —
the EOS token for SD 1.x, "!" (id 0) for SD 2.x. Longer prompts are truncated with a warning naming the
dropped text.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.weights.files import load_json

SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
END_OF_WORD = "</w>"
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
DEFAULT_MAX_LENGTH = 77
MAX_LENGTH_LIMIT = 1024  # transformers writes 10^30 for "unlimited"; every prompt is padded to this length

log = logging.getLogger(__name__)


class TokenizedPrompts(NamedTuple):
    """input_ids [B, model_max_length] int32; attention_mask [B, model_max_length] int32 (1 up to and including EOS)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> tokenizers.Tokenizer:
    """CLIP's normaliser, pre-tokeniser, BPE model and decoder around `vocab` and `merges`."""
    tokenizer = tokenizers.Tokenizer(
        BPE(vocab, merges, unk_token=unk_token, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_tokenizer_file(path: pathlib.Path) -> tokenizers.Tokenizer:
    """The `tokenizers` tokenizer saved in `path`; WeightsError naming the file if it holds none."""
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file that is not a tokenizer
        raise WeightsError(f"{path} is not a tokenizer.json of the tokenizers library ({' '.join(str(err).split())})") from err


def _token_text(value: Any, key: str, source: pathlib.Path) -> str:
    """A special token given as a string or as {"content": ...}."""
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str) or not text:
        raise WeightsError(f"{source}: {key}={value!r} must be a token string or {{'content': token}}")
    return text


class CLIPTokenizer:
    """Prompts -> fixed-length CLIP token ids. Build it with `CLIPTokenizer.from_folder(path)`."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: dict[str, str], model_max_length: int):
        if not isinstance(model_max_length, int) or not 2 <= model_max_length <= MAX_LENGTH_LIMIT:
            raise WeightsError(
                f"model_max_length={model_max_length!r} must be an int in 2..{MAX_LENGTH_LIMIT} (CLIP's is 77)"
            )
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            ids[key] = tokenizer.token_to_id(special_tokens[key])
            if ids[key] is None:
                raise WeightsError(f"{key}={special_tokens[key]!r} is not in the vocabulary")
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """Read a transformers CLIP tokenizer folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`;
        special tokens and `model_max_length` from `tokenizer_config.json`, then `special_tokens_map.json`."""
        folder = pathlib.Path(folder)
        special = dict(DEFAULT_SPECIAL_TOKENS)
        max_length = DEFAULT_MAX_LENGTH
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            if not path.is_file():
                continue
            content = load_json(path)
            special.update({key: _token_text(content[key], key, path) for key in special if content.get(key)})
            max_length = content.get("model_max_length", max_length)
        if (folder / "tokenizer.json").is_file():
            tokenizer = _read_tokenizer_file(folder / "tokenizer.json")
            tokenizer.no_padding()  # a saved tokenizer.json may carry padding and truncation; we apply our own
            tokenizer.no_truncation()
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            try:
                vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            except Exception as err:  # tokenizers raises a bare Exception for files it cannot read
                raise WeightsError(f"{folder}: vocab.json with merges.txt is not a BPE vocabulary "
                                   f"({' '.join(str(err).split())})") from err  # fmt: skip
            tokenizer = bpe_tokenizer(vocab, merges, special["unk_token"])
        else:
            raise WeightsError(f"{folder} has neither tokenizer.json nor vocab.json with merges.txt")
        tokenizer.add_special_tokens(sorted(set(special.values())))
        return cls(tokenizer, special, max_length)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out, word ends as spaces."""
        text = self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedPrompts:
        """Token ids of one prompt or a list of prompts, each BOS + tokens + EOS padded to model_max_length;
        prompts over model_max_length - 2 tokens are truncated, logging a warning with the dropped text."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"prompts must be a string or a list of strings, got {prompts!r}")
        length = self.model_max_length
        ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > length - 2:
                log.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to "
                    "%d tokens: %r", length, self.decode(tokens[length - 2 :]),
                )  # fmt: skip
                tokens = tokens[: length - 2]
            sequence = [self.bos_token_id, *tokens, self.eos_token_id]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return TokenizedPrompts(ids, mask)
