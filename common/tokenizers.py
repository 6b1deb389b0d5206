"""Tokenizers: the builtins' tiny ones, built in memory (no download), and counting a prompt's
tokens as a model's text encoder sees them (truncation warnings).

The gateway counts with ``token_counter``: the model's CLIP tokenizer rebuilt from its files
(``tokenizer.json``, else ``vocab.json`` and ``merges.txt``; ``tokenizer_config.json``) with the
``tokenizers`` library alone, exactly as transformers' ``CLIPTokenizer`` builds its backend, so
validating a request imports neither transformers nor torch and counts what the nodes count
(under transformers 4.x, whose ``CLIPTokenizer`` cleans text its own way, it counts with that
one). The nodes count with the tokenizer they loaded (``count_tokens``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy
    from tokenizers import AddedToken, Tokenizer
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
# a loaded tokenizer (the nodes)
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


# --------------------------------------------------------------------------------------------
# counting without transformers (the gateway)
# --------------------------------------------------------------------------------------------

#: transformers' limit where a tokenizer's config names none
_NO_LIMIT = int(1e30)
#: the named special tokens, with the defaults of transformers' ``CLIPTokenizer``
_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "sep_token": None, "pad_token": "<|endoftext|>",
             "cls_token": None, "mask_token": None}
#: what a serialized added token may say of itself
_TOKEN_FLAGS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass(frozen=True)
class TokenCounter:
    """How a model's text encoder counts a prompt: ``count(text)``, the tokens of ``text``
    before truncation, start and end tokens included (as ``count_tokens``); ``limit``, the
    tokens it sees (77 for CLIP)."""

    count: Callable[[str], int]
    limit: int


def token_counter(model_dir: Path | str) -> TokenCounter:
    """The counter of the model's tokenizer (its ``tokenizer`` subfolder, a CLIP tokenizer),
    built once per directory."""
    return _token_counter(str(Path(model_dir).resolve()))


@functools.lru_cache(maxsize=16)
def _token_counter(model_dir: str) -> TokenCounter:
    if int(importlib.metadata.version("transformers").split(".")[0]) < 5:
        # transformers 4.x's CLIPTokenizer is a Python one that cleans text its own way (each
        # CJK character apart, control characters dropped): count with it
        tokenizer = load_tokenizer(model_dir)
        return TokenCounter(functools.partial(count_tokens, tokenizer),
                            int(tokenizer.model_max_length))
    folder = Path(model_dir) / "tokenizer"
    config = _read_json(folder / "tokenizer_config.json") or {}
    backend = clip_backend(folder, config)
    return TokenCounter(lambda text: len(backend.encode(text).ids),
                        int(config.get("model_max_length", _NO_LIMIT)))


def clip_backend(folder: Path, config: dict[str, Any]) -> Tokenizer:
    """The ``tokenizers`` backend transformers' ``CLIPTokenizer`` (5.x) builds from tokenizer
    ``folder`` and its ``config`` (``tokenizer_config.json``): a byte-level BPE with CLIP's
    normalizer, pre-tokenizer and start/end tokens, and the added tokens (special ones too)
    that its files name, each as its files say it matches."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    fast = _read_json(folder / "tokenizer.json")
    if fast is not None:
        vocab = fast["model"]["vocab"]
        merges = [_pair(m) for m in fast["model"]["merges"]]
    else:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    added, named = _added_tokens(folder, config, fast)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=str(named["unk_token"])))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                  r"""[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.add_tokens(added)
    bos, eos = (_token_id(backend, str(named[key])) for key in ("bos_token", "eos_token"))
    backend.post_processor = processors.RobertaProcessing(eos, bos, trim_offsets=False,
                                                          add_prefix_space=False)
    return backend


def _token_id(backend: Tokenizer, token: str) -> tuple[str, int]:
    found = backend.token_to_id(token)
    if found is None:
        raise ValueError(f"the tokenizer's vocabulary has no {token!r}")
    return token, found


def _pair(merge: str | list[str]) -> tuple[str, str]:
    """A BPE merge as ``tokenizer.json`` writes it ("a b", or ["a", "b"])."""
    first, second = merge.split(" ") if isinstance(merge, str) else merge
    return first, second


def _added_tokens(folder: Path, config: dict[str, Any], fast: dict[str, Any] | None
                  ) -> tuple[list[AddedToken], dict[str, str | None]]:
    """The tokens transformers adds to a CLIP tokenizer's backend, and its named special
    tokens: those ``added_tokens_decoder`` lists, else (files saved by older versions) those of
    ``added_tokens.json`` and ``tokenizer.json`` (and the named ones as
    ``special_tokens_map.json`` says); then each named special token not among them. Each
    matches as it says of itself (in the normalized text or not, ...)."""
    from tokenizers import AddedToken

    def serialized(value: dict[str, Any], **flags: Any) -> AddedToken:
        return AddedToken(**{**{k: v for k, v in value.items() if k in _TOKEN_FLAGS}, **flags})

    named: dict[str, Any] = {}
    for key, default in _SPECIALS.items():
        value = config.get(key, default)
        named[key] = serialized(value) if isinstance(value, dict) else value
    added: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in config:
        for _, value in sorted(config["added_tokens_decoder"].items(), key=lambda e: int(e[0])):
            added.setdefault(value["content"], serialized(value))
    else:
        for key, value in (_read_json(folder / "special_tokens_map.json") or {}).items():
            if key in named and value:
                named[key] = serialized(value, special=True) if isinstance(value, dict) else value
        texts = {str(value) for value in named.values() if value}
        for content in _read_json(folder / "added_tokens.json") or {}:
            added.setdefault(content, AddedToken(content, normalized=content not in texts,
                                                 special=content in texts))
        for value in (fast or {}).get("added_tokens", []):
            added.setdefault(value["content"], serialized(value))
    specials: dict[str, AddedToken] = {}
    for value in named.values():  # of two with one text the later counts, as in transformers
        if value and str(value) not in added:
            special = value if isinstance(value, AddedToken) else AddedToken(value, special=True)
            special.special = True
            specials[str(value)] = special
    added.update(specials)
    return list(added.values()), {k: str(v) if v else None for k, v in named.items()}


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; None where there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
