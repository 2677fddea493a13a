"""Offline tokenizers: open_clip's shipped BPE, and an HF tokenizer from a local directory."""

import pytest

from aimv2.config import TokenizerConfig
from aimv2.data.tokenizer import build_tokenizer
from aimv2.errors import UserError


def test_clip_tokenizer_offline_pads_truncates_and_ends_with_eot():
    tok = build_tokenizer(TokenizerConfig(kind="clip", max_length=6))
    assert tok.vocab_size == 49408 and tok.eot_id == 49407 and tok.bos_id == 49406  # <start_of_text>
    ids, mask = tok(["a handwritten digit", "one two three four five six seven"])
    assert ids.shape == mask.shape == (2, 6)
    assert ids[0].tolist()[:4] == tok.encode("a handwritten digit") + [tok.eot_id]
    assert mask[0].tolist() == [True] * 4 + [False] * 2
    assert mask[1].all() and ids[1, -1] == tok.eot_id  # truncated, end-of-text kept


def _save_local_hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "digit": 4, "seven": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)


def test_hf_tokenizer_from_a_local_directory_sets_vocab(tmp_path):
    _save_local_hf_tokenizer(tmp_path / "tok")
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "tok"), max_length=5))
    assert tok.vocab_size == 6 and tok.eot_id == 1
    assert tok.bos_id is None  # this vocabulary has no begin-of-sequence token (like Qwen2's)
    ids, mask = tok(["a digit seven", "seven"])
    assert ids.tolist() == [[3, 4, 5, 1, 0], [5, 1, 0, 0, 0]]
    assert mask.sum(1).tolist() == [4, 2]


def test_hf_tokenizer_missing_directory_is_named(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer.path: tokenizer directory not found"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "absent")))


def test_word_tokenizer_from_a_word_list(tmp_path):
    from aimv2.data.tokenizer import write_vocabulary

    assert write_vocabulary(["a Red circle", "the shape cross, coloured red"], tmp_path / "vocab.txt") == 8
    tok = build_tokenizer(TokenizerConfig(kind="words", path=str(tmp_path / "vocab.txt"), max_length=6))
    assert tok.vocab_size == 3 + 8 and (tok.pad_id, tok.eot_id, tok.bos_id) == (0, 1, None)
    ids, mask = tok(["A red cross, big"])
    assert tok.decode(ids[0].tolist()) == "a red cross , <unk>"
    assert mask[0].tolist() == [True] * 6 and ids[0, -1] == tok.eot_id  # 5 words + end of text
    with pytest.raises(UserError, match="data.tokenizer.path: word list not found"):
        build_tokenizer(TokenizerConfig(kind="words", path=str(tmp_path / "absent.txt")))
