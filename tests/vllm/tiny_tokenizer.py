"""The tiny checkpoints' tokenizer: byte-level BPE over the 256 bytes (no merges: one token per
byte) plus the model's special tokens, made with the `tokenizers` library (no download)."""

from __future__ import annotations


def byte_level(specials: tuple[str, ...], **tokens):
    """A PreTrainedTokenizerFast: ids 0..255 the bytes, then ``specials`` in order (256, 257, ...);
    ``tokens``: its named tokens (eos_token=..., extra_special_tokens=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **tokens)


def _byte_of(char: str) -> int:
    """The byte that ByteLevel's printable character stands for (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(char) - 256]
