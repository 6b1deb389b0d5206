"""Tokenizers: the builtins' tiny ones, built in memory (no download), and counting a prompt's
tokens as a model's text encoder sees them (truncation warnings).
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy
    from transformers import CLIPTokenizer

# --------------------------------------------------------------------------------------------
# the tiny tokenizers of the builtins
# --------------------------------------------------------------------------------------------

#: words whose merges the tiny BPE knows, so that common prompts are not all single bytes
_WORDS = (
    "a an the of on in with and photo picture painting portrait landscape cat dog horse "
    "astronaut riding mars moon city street night day sunset forest mountain river sea sky "
    "red green blue white black golden high quality detailed realistic style art by oil "
    "watercolor digital cinematic lighting beautiful old young man woman girl boy house tree "
    "flower car robot castle dragon blurry low bad ugly"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.cache
def tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: 256 byte symbols, the same with ``</w>``, merges, specials."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in known:
                merges.append((parts[0], parts[1]))
                tokens.append(merged)
                known.add(merged)
            parts = [merged, *parts[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_t5_tokenizer():
    """The builtins' T5 tokenizer, built in memory: a SentencePiece-style unigram model over
    the tiny BPE's words and the printable ASCII characters, ending every text in ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in dict.fromkeys(_WORDS)]
    pieces += [(chr(c), -5.0) for c in range(32, 127)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=512)


def build_tiny_tokenizer() -> CLIPTokenizer:
    """The builtins' CLIP tokenizer, built in memory (model_max_length 77, like SD's)."""
    import transformers
    from transformers import CLIPTokenizer

    vocab, merges = tiny_bpe()
    if int(transformers.__version__.split(".")[0]) >= 5:
        # the tokenizers-backed class takes the vocabulary itself (the merges as pairs, though
        # its annotation says strings)
        return CLIPTokenizer(vocab=dict(vocab), merges=merges,  # type: ignore[arg-type]
                             model_max_length=77)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4.x wants files
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            vocab_file=str(vocab_file), merges_file=str(merges_file), model_max_length=77
        )


# --------------------------------------------------------------------------------------------
# tokenizer helpers (request validation, truncation warnings)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_tokenizer(model_dir: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")


def load_tokenizer(model_dir: Path | str) -> CLIPTokenizer:
    """The model's tokenizer, loaded once per directory."""
    return _load_tokenizer(str(Path(model_dir).resolve()))


def token_limit(model_dir: Path | str) -> int:
    """How many tokens (start and end tokens included) the text encoder sees: 77 for SD."""
    return int(load_tokenizer(model_dir).model_max_length)


def count_tokens(tokenizer: CLIPTokenizer, text: str) -> int:
    """Tokens of ``text`` before truncation, start and end tokens included (as diffusers
    counts them when it decides whether a prompt was truncated)."""
    # verbose=False: no "sequence length is longer than the maximum" log line per long prompt
    return len(tokenizer(text, padding=False, truncation=False, verbose=False).input_ids)
