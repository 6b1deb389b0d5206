"""Counting a prompt's tokens without transformers (``common.tokenizers.token_counter``): the
same counts and limits as transformers' ``CLIPTokenizer`` on the builtins' tokenizers and on
the layouts real repositories ship, over long and awkward prompts; and validating a request in
the gateway imports neither torch, transformers nor diffusers."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from common.models import BUILTIN_PREFIX, builtin_family, builtin_names, resolve_model_dir
from common.tokenizers import _token_counter, clip_backend, count_tokens, token_counter

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "", "a cat", "A Photo of an Astronaut riding a HORSE on Mars!!!", "wow!!! ?!? ...",
    "a photo of the cat " * 40, "x" * 500, "tabs\tand\nnewlines   and   spaces",
    "  leading and trailing  ", "Café naïve résumé Ångström", "日本語のプロンプト 猫",
    "emoji 🐱🚀", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "control\x00\x07chars\u200b zero-width",
    "it's they're we've I'm you'll he'd", "numbers 12345 3.14 1e10", "!", "!!", "a!b!c",
    "<|startoftext|>hello<|endoftext|>", "<|STARTOFTEXT|> x <|EndOfText|>",
    "a <cat-toy> on <my-style>", "<CAT-TOY> <MY-STYLE>",
]


def _random_prompts(n: int) -> list[str]:
    """Prompts drawn from words, case, punctuation, digits, non-ASCII and special tokens."""
    rng = random.Random(7)
    pieces = ["a", "cat", "Dragon", "HIGH", "quality", "!", "!!", "?", ",", ".", "'s", "'LL",
              "42", "3.5", "é", "Ω", "猫", "🐱", "\t", "\n", "  ", "-", "_", "<|endoftext|>",
              "<|startoftext|>", "<cat-toy>", "<MY-STYLE>", "\u00a0", "\u200b", "ǅ", "ß"]
    return ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randrange(40)))
            for _ in range(n)]


def _assert_counts_alike(model_dir: Path) -> None:
    """The counter and transformers' tokenizer agree on every prompt, the limit and the added
    tokens (each matching alike)."""
    tok = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer")
    _token_counter.cache_clear()
    counter = token_counter(model_dir)
    assert counter.limit == tok.model_max_length
    for prompt in PROMPTS + _random_prompts(200):
        assert counter.count(prompt) == count_tokens(tok, prompt), prompt
    folder = model_dir / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    ours = clip_backend(folder, config).get_added_tokens_decoder()
    theirs = tok.backend_tokenizer.get_added_tokens_decoder()
    assert sorted(map(repr, ours.values())) == sorted(map(repr, theirs.values()))


@pytest.fixture(scope="module")
def tiny_sd(cache_dir: Path) -> Path:
    return resolve_model_dir(BUILTIN_PREFIX + "tiny-sd", cache_dir / "models")


@pytest.mark.parametrize("name", [n for n in builtin_names() if builtin_family(n)])
def test_counts_as_transformers_on_the_builtins(name: str, cache_dir: Path) -> None:
    model_dir = resolve_model_dir(BUILTIN_PREFIX + name, cache_dir / "models")
    _assert_counts_alike(model_dir)
    assert token_counter(model_dir).count("a " * 76) == 78  # one past the limit


def _serialized(content: str, normalized: bool = True, **more: object) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, **more}


def _layouts(source: Path) -> dict[str, tuple[dict, dict[str, object]]]:
    """Tokenizer layouts as repositories ship them: (tokenizer_config.json, other files)."""
    vocab = json.loads((source / "vocab.json").read_text())
    classic = {"vocab.json": None, "merges.txt": None}
    fast = json.loads((source / "tokenizer.json").read_text())
    fast["added_tokens"].append({"id": len(vocab), **_serialized("<my-style>", special=False)})
    return {
        # an SD 1.5 repository: no tokenizer.json, special tokens as serialized AddedTokens
        "sd15": ({"bos_token": {"__type": "AddedToken", **_serialized("<|startoftext|>")},
                  "eos_token": {"__type": "AddedToken", **_serialized("<|endoftext|>")},
                  "unk_token": {"__type": "AddedToken", **_serialized("<|endoftext|>")},
                  "pad_token": "<|endoftext|>", "do_lower_case": True, "model_max_length": 77,
                  "special_tokens_map_file": "./special_tokens_map.json",
                  "tokenizer_class": "CLIPTokenizer"},
                 {**classic, "special_tokens_map.json": {
                     "bos_token": _serialized("<|startoftext|>"),
                     "eos_token": _serialized("<|endoftext|>"),
                     "unk_token": _serialized("<|endoftext|>"), "pad_token": "<|endoftext|>"}}),
        # an SDXL repository's second tokenizer: added_tokens_decoder, "!" pads
        "sdxl-2": ({"added_tokens_decoder": {
                        str(vocab["!"]): _serialized("!", False, special=True),
                        str(vocab["<|startoftext|>"]): _serialized("<|startoftext|>",
                                                                   special=True),
                        str(vocab["<|endoftext|>"]): _serialized("<|endoftext|>", False,
                                                                 special=True)},
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "!", "unk_token": "<|endoftext|>", "model_max_length": 77,
                    "tokenizer_class": "CLIPTokenizer"}, classic),
        # a textual inversion's word in added_tokens.json, "!" padding by special_tokens_map
        "added": ({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"},
                  {**classic, "added_tokens.json": {"<cat-toy>": len(vocab)},
                   "special_tokens_map.json": {
                       "pad_token": "!", "bos_token": _serialized("<|startoftext|>", False)}}),
        # tokenizer.json alone, with an added word; no limit named
        "fast": ({"tokenizer_class": "CLIPTokenizer"}, {"tokenizer.json": fast}),
    }


@pytest.mark.parametrize("layout", ["sd15", "sdxl-2", "added", "fast"])
def test_counts_as_transformers_on_repository_layouts(layout: str, tiny_sd: Path,
                                                      tmp_path: Path) -> None:
    source = tiny_sd / "tokenizer"
    config, files = _layouts(source)[layout]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, data in files.items():
        if data is None:
            shutil.copy(source / name, folder / name)
        else:
            (folder / name).write_text(json.dumps(data))
    _assert_counts_alike(tmp_path)


def test_validating_a_request_imports_no_torch(tiny_sd: Path, cache_dir: Path) -> None:
    """The gateway's modules, and validating and planning a request (token counts, the native
    size, the pools), load neither torch, transformers nor diffusers."""
    script = f"""
import sys
from pathlib import Path
import gateway.app, gateway.ingress, common.workflow, common.modelinfo
from common.modelinfo import LocalModelInfo
from common.workflow import builtin_workflows, validate_params
from gateway.admission import steps_of

spec = builtin_workflows()["txt2img"]
valid = validate_params(spec, {{"prompt": "a cat " * 80}},
                        LocalModelInfo(Path({str(cache_dir / "models")!r})))
steps_of(spec, valid.params, spec.compile())
assert valid.warnings and valid.params["width"] == 64, valid
print(sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                         "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "[]", out.stderr
