"""T5's SentencePiece (Unigram) tokenizer, as SD3 and Flux pipelines call it: from a folder's `tokenizer.json` through
the `tokenizers` library (transformers' `T5TokenizerFast` file), or from a folder holding only `spiece.model`
through the `sentencepiece` package when it is installed (it is not a jaxdiff dependency).

Every prompt becomes exactly `max_length` ids: its tokens, EOS (`</s>`, id 1 for T5), then the pad id (`<pad>`, 0),
and a mask of 1 over tokens and EOS. Prompts of more than max_length − 1 tokens are truncated with a warning naming
the dropped text, as diffusers warns. The pipelines set max_length (diffusers' `max_sequence_length`: SD3 256,
Flux.1-dev 512, Flux.1-schnell 256); without it, the folder's `model_max_length` (T5's 512).

From a tokenizer.json (a Unigram model) the vocabulary, added tokens and decoder are used as saved; the text is
normalised by the file's SentencePiece character map (its `Precompiled` normaliser, where it has one) and split into
words at whitespace, each word marked by a leading "▁" (Metaspace), as transformers 5's T5 tokenizer rebuilds it
from the same file and as SentencePiece itself does: whitespace runs and leading or trailing whitespace make no
tokens. (Older transformers used the file's own pre-tokeniser, which gives an extra "▁" token at a trailing space
and before an added token such as "</s>" written in a prompt.) The file's padding, truncation and post-processor
are replaced by the rule above. From a spiece.model, SentencePiece tokenizes the text itself: the same ids, except
that a special token's text written in a prompt ("</s>", "<extra_id_0>") is tokenized as text, not as that token.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers

from jaxdiff.checks import is_int, prompt_list
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.clip_tokenizer import TokenizedPrompts, _read_tokenizer_file, _token_text
from jaxdiff.weights.files import load_json

DEFAULT_SPECIAL_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>"}
DEFAULT_MAX_LENGTH = 512
WORD_START = "\u2581"  # "▁", SentencePiece's mark of a word's first piece
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # read in this order, the later winning

log = logging.getLogger(__name__)


def unigram_tokenizer(path: pathlib.Path) -> tokenizers.Tokenizer:
    """The Unigram tokenizer saved in `path` with T5's normaliser and pre-tokeniser (see the module doc);
    WeightsError naming the file if it holds another model."""
    tokenizer = _read_tokenizer_file(path)
    tokenizer.no_padding()  # a saved tokenizer.json may carry padding and truncation; the rule above replaces them
    tokenizer.no_truncation()
    settings = load_json(path)
    kind = settings["model"].get("type")
    if kind != "Unigram":
        raise WeightsError(f"{path}: model type {kind!r}; T5's tokenizer.json holds a 'Unigram' model")
    normalizer = settings.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmaps = [step["precompiled_charsmap"] for step in steps if step.get("type") == "Precompiled"]
    tokenizer.normalizer = normalizers.Precompiled(base64.b64decode(charsmaps[0])) if charsmaps else None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(WORD_START)]
    )  # Metaspace's defaults: "▁" before every word, split at "▁"
    return tokenizer


class TokenizersBackend:
    """A tokenizer.json through `tokenizers` (`unigram_tokenizer`)."""

    def __init__(self, path: pathlib.Path):
        self.tokenizer = unigram_tokenizer(path)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, no special tokens added."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class SentencePieceBackend:
    """A spiece.model through the `sentencepiece` package; WeightsError in one line where it is not installed."""

    def __init__(self, path: pathlib.Path):
        if importlib.util.find_spec("sentencepiece") is None:
            raise WeightsError(f"{path.parent} has only spiece.model, which needs the sentencepiece package: "
                               "pip install sentencepiece (or give the folder a tokenizer.json)")  # fmt: skip
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise WeightsError(f"{path} is not a SentencePiece model ({' '.join(str(err).split())})") from err

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, no special tokens added."""
        return [list(ids) for ids in self.processor.Encode(prompts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.Decode(list(map(int, ids)))

    def token_id(self, token: str) -> int | None:
        piece_id = self.processor.PieceToId(token)
        return None if self.processor.IdToPiece(piece_id) != token else piece_id


class T5Tokenizer:
    """Prompts -> fixed-length T5 token ids. Build it with `T5Tokenizer.from_folder(path)`; `backend` is a
    `TokenizersBackend` or a `SentencePieceBackend`."""

    def __init__(
        self,
        backend: TokenizersBackend | SentencePieceBackend,
        *,
        eos_token_id: int,
        pad_token_id: int,
        model_max_length: int,
    ):
        self.backend = backend
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.model_max_length = model_max_length

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> T5Tokenizer:
        """Read a transformers T5 tokenizer folder: `tokenizer.json` if present, else `spiece.model` (needs the
        `sentencepiece` package); eos_token, pad_token and model_max_length from `tokenizer_config.json`, then
        `special_tokens_map.json` (defaults "</s>", "<pad>", 512)."""
        folder = pathlib.Path(folder)
        special, max_length = dict(DEFAULT_SPECIAL_TOKENS), DEFAULT_MAX_LENGTH
        for name in SETTINGS_FILES:
            path = folder / name
            if path.is_file():
                content = load_json(path)
                special.update({key: _token_text(content[key], key, path) for key in special if content.get(key)})
                max_length = content.get("model_max_length", max_length)
        if not is_int(max_length, numpy=False) or max_length < 2:
            raise WeightsError(f"{folder}: model_max_length={max_length!r} must be an int >= 2")
        if (folder / "tokenizer.json").is_file():
            backend = TokenizersBackend(folder / "tokenizer.json")
        elif (folder / "spiece.model").is_file():
            backend = SentencePieceBackend(folder / "spiece.model")
        else:
            raise WeightsError(f"{folder} has neither tokenizer.json nor spiece.model")
        ids = {key: backend.token_id(token) for key, token in special.items()}
        for key, value in ids.items():
            if value is None:
                raise WeightsError(f"{folder}: {key}={special[key]!r} is not in the vocabulary")
        return cls(backend, eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"], model_max_length=max_length)

    def __call__(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> TokenizedPrompts:
        """Token ids [B, max_length] int32 of one prompt or a list: tokens + EOS, padded with the pad id;
        attention_mask [B, max_length] int32 is 1 over tokens and EOS. max_length None is model_max_length."""
        prompts = prompt_list(prompts, "prompts")
        length = self.model_max_length if max_length is None else max_length
        if not is_int(length) or length < 2:
            raise UsageError(f"max_length={max_length!r} must be an int >= 2")
        ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), length), np.int32)
        for row, tokens in enumerate(self.backend.encode(prompts)):
            if len(tokens) > length - 1:
                log.warning(
                    "The following part of your input was truncated because `max_sequence_length` is set to %d "
                    "tokens: %r", length, self.backend.decode(tokens[length - 1 :]),
                )  # fmt: skip
                tokens = tokens[: length - 1]
            sequence = [*tokens, self.eos_token_id]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return TokenizedPrompts(ids, mask)
