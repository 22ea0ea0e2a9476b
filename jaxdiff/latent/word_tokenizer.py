"""A word-level tokenizer for captions, with a vocabulary built from the captions themselves.

The LDM paper's text-to-image models trained their text transformer jointly with the U-Net on their own
vocabulary; this is that vocabulary for small captioned datasets. Text is lowercased and split on
whitespace; each word is one token. Ids: 0 `<pad>`, 1 `<unk>`, 2 `<start>`, 3 `<end>`, then the
words in sorted order from 4 (the end id is not 2, which CLIP text configs read as "pool at the
largest id"). Like CLIP's tokenizer, every prompt becomes exactly `max_length` ids: start, words, end,
then pad; the attention mask is 1 up to and including the end token. The empty prompt is start, end, pad…
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from jaxdiff.checks import is_int, prompt_list
from jaxdiff.errors import UsageError, WeightsError
from jaxdiff.latent.clip_tokenizer import TokenizedPrompts
from jaxdiff.weights.files import parse_json

SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")
PAD_ID, UNK_ID, START_ID, END_ID = range(len(SPECIAL_TOKENS))
UNKNOWN_WORDS = ("error", "unk")
JSON_FORMAT = "jaxdiff.latent.word_tokenizer"


def _words(text: str) -> list[str]:
    return text.lower().split()


class WordTokenizer:
    """Prompts -> fixed-length word ids. Build it with `from_captions` or `from_json`."""

    def __init__(self, words: Sequence[str], *, max_length: int):
        """`words`: the vocabulary (unique, sorted, lowercase, no whitespace, no special token)."""
        if not is_int(max_length, numpy=False) or max_length < 2:
            raise UsageError(f"max_length={max_length!r} must be an int >= 2 (start and end tokens)")
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or w != w.lower() or _words(w) != [w] or w in SPECIAL_TOKENS]
        if bad:
            raise UsageError(f"vocabulary words must be lowercase, without whitespace, not {SPECIAL_TOKENS}: {bad!r}")
        if words != sorted(set(words)):
            raise UsageError("vocabulary words must be unique and sorted")
        self.words = tuple(words)
        self.max_length = max_length
        self.tokens = SPECIAL_TOKENS + self.words
        self._ids = {word: i for i, word in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_captions(cls, captions: Sequence[str], *, max_length: int = 16) -> WordTokenizer:
        """The sorted set of words of `captions` as vocabulary."""
        captions = prompt_list(captions, "captions", allow_empty=True)
        if not captions:
            raise UsageError("captions is empty: the vocabulary needs at least one caption")
        return cls(sorted({word for caption in captions for word in _words(caption)}), max_length=max_length)

    def encode(self, prompts: str | Sequence[str], *, unknown: str = "error") -> TokenizedPrompts:
        """ids int32 [B, max_length] (start, words, end, pad...) and attention mask int32 [B, max_length].

        Words outside the vocabulary raise a ValueError naming them (`unknown="error"`) or become
        `<unk>` (`unknown="unk"`). A prompt of more than max_length − 2 words raises a ValueError.
        """
        if unknown not in UNKNOWN_WORDS:
            raise UsageError(f"unknown={unknown!r} is not one of {UNKNOWN_WORDS}")
        prompts = prompt_list(prompts, "prompts", allow_empty=True)
        split = [_words(p) for p in prompts]
        too_long = [p for p, words in zip(prompts, split) if len(words) > self.max_length - 2]
        if too_long:
            raise UsageError(f"prompts longer than max_length - 2 = {self.max_length - 2} words: {too_long!r}")
        missing = sorted({word for words in split for word in words if word not in self._ids})
        if missing and unknown == "error":
            raise UsageError(f"words outside the vocabulary: {missing!r} (pass unknown='unk' to map them to <unk>)")
        ids = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, words in enumerate(split):
            sequence = [START_ID, *(self._ids.get(word, UNK_ID) for word in words), END_ID]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return TokenizedPrompts(ids, mask)

    def decode(self, ids: Sequence[int]) -> str:
        """The words of token ids joined by spaces; <pad>, <start> and <end> are left out, <unk> kept."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UsageError(f"token ids {bad} are outside [0, {self.vocab_size})")
        return " ".join(self.tokens[i] for i in ids if i not in (PAD_ID, START_ID, END_ID))

    def to_json(self) -> str:
        """The tokenizer as JSON text: {"format", "max_length", "words"}."""
        return json.dumps({"format": JSON_FORMAT, "max_length": self.max_length, "words": list(self.words)})

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        """The tokenizer saved by `to_json`."""
        content = parse_json(text, "word tokenizer JSON")
        keys = {"format", "max_length", "words"}
        if not isinstance(content, dict) or set(content) != keys or content["format"] != JSON_FORMAT:
            raise WeightsError(
                f"word tokenizer JSON must be an object with keys {sorted(keys)} and format {JSON_FORMAT!r}"
            )
        if not isinstance(content["words"], list):
            raise WeightsError(f"word tokenizer JSON: words must be a list, got {content['words']!r}")
        return cls(content["words"], max_length=content["max_length"])
