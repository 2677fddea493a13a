"""Caption tokenizers that work offline.

Default: the CLIP BPE vocabulary that ships inside open_clip's wheel (49408 tokens). Alternatively
any Hugging Face tokenizer saved in a local directory, or a word list (`kind: words`) for generated
toy sets whose captions use a few dozen words: there CLIP's 49408-way output layer is most of a
debug-size step (docs/performance.md), and a word list needs no package. Captions become
`max_length` ids ending with the end-of-text token (kept even when the caption is truncated) plus a
mask of the real positions;
the learned start token of the decoder replaces a start-of-text token.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from aimv2.config import TokenizerConfig
from aimv2.errors import UserError


class CaptionTokenizer:
    """Base: subclasses set `vocab_size`, `eot_id` and implement `encode(text) -> list[int]`;
    `bos_id` is the begin-of-sequence token where the vocabulary has one (an attached LLM expects it
    first), else None."""

    vocab_size: int
    eot_id: int
    pad_id: int = 0
    bos_id: int | None = None

    def __init__(self, max_length: int):
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens dropped): shows a caption the decoder generated."""
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, L) int64 padded with pad_id, mask (B, L) bool (True on real tokens)."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.bool)
        for row, text in enumerate(texts):
            seq = self.encode(text)[: self.max_length - 1] + [self.eot_id]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        return ids, mask


class ClipTokenizer(CaptionTokenizer):
    def __init__(self, max_length: int = 77):
        super().__init__(max_length)
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer()
        self.vocab_size = len(self._bpe.encoder)
        self.eot_id = self._bpe.encoder["<end_of_text>"]
        self.bos_id = self._bpe.encoder["<start_of_text>"]

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def decode(self, ids: list[int]) -> str:
        special = set(self._bpe.all_special_ids)
        return " ".join(self._bpe.decode([i for i in ids if i not in special]).split())


class HFTokenizer(CaptionTokenizer):
    def __init__(self, path: str, max_length: int = 77):
        super().__init__(max_length)
        if not Path(path).is_dir():
            raise UserError(f"data.tokenizer.path: tokenizer directory not found: {path}")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise UserError(
                f"data.tokenizer.path: cannot load a tokenizer from {path}: {str(err).splitlines()[0]}"
            ) from None
        self.vocab_size = len(self._tok)
        eot = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if eot is None:
            raise UserError(f"data.tokenizer.path: tokenizer in {path} has no eos or sep token to end captions")
        self.eot_id = eot
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else eot
        self.bos_id = self._tok.bos_token_id  # None for tokenizers without one (Qwen2's)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()


_WORD_RE = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")  # lower-case words and numbers; punctuation marks alone


def split_words(text: str) -> list[str]:
    """The word tokenizer's pieces of a caption: lower-cased words, numbers and punctuation marks."""
    return _WORD_RE.findall(text.lower())


def write_vocabulary(captions, path: str | Path) -> int:
    """A word list (one word per line, sorted) holding every piece of `captions`; returns its length."""
    from aimv2.fileio import atomic_write

    words = sorted({w for caption in captions for w in split_words(caption)})
    atomic_write(path, "".join(f"{w}\n" for w in words))
    return len(words)


class WordTokenizer(CaptionTokenizer):
    """One id per word of a word list: 0 padding, 1 end of text, 2 unknown, then the list in order."""

    SPECIAL = ("<pad>", "<end_of_text>", "<unk>")

    def __init__(self, path: str, max_length: int = 77):
        super().__init__(max_length)
        try:
            words = [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines() if w.strip()]
        except OSError:
            raise UserError(f"data.tokenizer.path: word list not found or unreadable: {path}") from None
        self._words = [*self.SPECIAL, *words]
        self._ids = {w: i for i, w in enumerate(self._words)}
        self.vocab_size, self.pad_id, self.eot_id, self.unk_id = len(self._words), 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids if i >= len(self.SPECIAL) or i == self.unk_id)


def build_tokenizer(cfg: TokenizerConfig) -> CaptionTokenizer:
    if cfg.kind == "clip":
        return ClipTokenizer(cfg.max_length)
    if cfg.kind == "hf":
        return HFTokenizer(cfg.path, cfg.max_length)
    if cfg.kind == "words":
        return WordTokenizer(cfg.path, cfg.max_length)
    raise UserError(f"config key 'data.tokenizer.kind': unknown tokenizer {cfg.kind!r} (clip, hf or words)")
