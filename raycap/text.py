"""Caption text: standardisation, the top-k Vocabulary, and encoding/decoding of token ids."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)  # fixed ids 0..3; <pad> is 0 so masks are `ids != 0`

_PUNCTUATION = re.compile(r"[!\"#$%&()*+.,\-/:;=?@\[\\\]^_`{|}~']")
_SPACES = re.compile(r"\s+")


def standardize(caption: str) -> str:
    """Lower-case, strip punctuation (as the TensorFlow tutorial does) and collapse white space."""
    return _SPACES.sub(" ", _PUNCTUATION.sub("", caption.lower())).strip()


def words(caption: str) -> list[str]:
    """The standardised words of a caption, without markers."""
    return standardize(caption).split()


@dataclass(frozen=True)
class Vocabulary:
    """Token strings by id: the specials, then words by descending frequency (ties alphabetical)."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, captions: Iterable[str], max_size: int = 5000) -> Vocabulary:
        """The `max_size` most frequent words (specials included in the count); the rest map to <unk>."""
        if max_size <= len(SPECIALS):
            raise ValueError(f"vocabulary size must exceed {len(SPECIALS)}, got {max_size}")
        return cls.from_counts(Counter(w for c in captions for w in words(c)), max_size)

    @classmethod
    def from_counts(cls, counts: Counter, max_size: int = 5000) -> Vocabulary:
        """The vocabulary of word counts summed elsewhere (e.g. by the tasks that read the captions)."""
        if max_size <= len(SPECIALS):
            raise ValueError(f"vocabulary size must exceed {len(SPECIALS)}, got {max_size}")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = [w for w, _ in ranked if w not in SPECIALS][: max_size - len(SPECIALS)]
        return cls(SPECIALS + tuple(kept))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 2

    @property
    def end_id(self) -> int:
        return 3

    def id(self, token: str) -> int:
        return self._ids.get(token, 1)  # type: ignore[attr-defined]

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """`<start> w1 … wn <end>` as ids; with `max_length`, words are cut so the result fits."""
        ids = [self.id(w) for w in words(caption)]
        if max_length is not None:
            ids = ids[: max(0, max_length - 2)]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Words up to the first `<end>`, without `<start>`/`<pad>`."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.tokens[i])
        return out

    def to_json(self) -> str:
        return json.dumps({"tokens": list(self.tokens)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls(tuple(json.loads(text)["tokens"]))
