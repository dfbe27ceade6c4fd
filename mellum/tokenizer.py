"""Tokenizer: wraps Hugging Face `tokenizers` with the Mellum special tokens, and trains a byte-level BPE.

Loads any Hugging Face `tokenizer.json` (the real Mellum one included). Encoding data never turns special-token
strings that occur inside ordinary code into special tokens (`allow_special=False`, the default); prompts built
by `mellum.prompt` are encoded with `allow_special=True`.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

# REFERENCE.md §1: `<|endoftext|>` is id 0 and serves as BOS = EOS = PAD; no BOS is prepended.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<reponame>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)
EOS = "<|endoftext|>"

# A chat template for instruct models (ChatML with the tokens above), stored in tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    """Text ⇄ token ids. `encode` treats special-token strings as plain text unless `allow_special=True`."""

    def __init__(self, hf_tokenizer, config: dict | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self._special = hf_tokenizer
        # A twin without added tokens: special strings inside data are then split like any other text.
        data = json.loads(hf_tokenizer.to_str())
        data["added_tokens"] = []
        self._plain = HFTokenizer.from_str(json.dumps(data))
        self.config = dict(config or {})
        # transformers also writes special tokens as serialised AddedTokens ({"__type": "AddedToken", "content": ...})
        # and reads both forms; keep the string, which is what every lookup here needs.
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if isinstance(self.config.get(key), dict) and "content" in self.config[key]:
                self.config[key] = self.config[key]["content"]

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` from a directory (with its `tokenizer_config.json` if present) or a file."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(HFTokenizer.from_file(str(file)), config)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by transformers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._special.save(str(directory / "tokenizer.json"))
        eos = self.config.get("eos_token", EOS)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": eos,
            "unk_token": eos,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "additional_special_tokens": [t for t in self.special_tokens if t != eos],
            "chat_template": CHAT_TEMPLATE,
        }
        config.update({k: v for k, v in self.config.items() if k not in config})
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # ---- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._special.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(t.content for t in self._special.get_added_tokens_decoder().values() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self._special.token_to_id(token)

    def id_of(self, token: str) -> int:
        """The id of a token that must exist (e.g. a FIM control token); a clear error otherwise."""
        token_id = self._special.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return token_id

    @property
    def eos_id(self) -> int:
        return self.id_of(self.config.get("eos_token", EOS))

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.id_of(t) for t in self.special_tokens)

    @cached_property
    def token_strings(self) -> list[str]:
        """Each id decoded on its own (partial UTF-8 bytes show as U+FFFD); used by token healing."""
        return [self._special.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

    # ---- encoding ------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        tok = self._special if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        tok = self._special if allow_special else self._plain
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_segments(self, segments: Sequence[tuple[str, str]]) -> list[int]:
        """Encode ("literal", s) / ("text", s) pieces of a prompt (`PromptFormat.segments`).

        Literals are split at special tokens; everything between two special tokens — literal and caller text
        together — is one run encoded with `allow_special=False`, exactly as training samples are, so special
        strings inside code never become control tokens.
        """
        runs: list[tuple[bool, str]] = []  # (is_special, text)
        for kind, piece in segments:
            parts = self._special_split.split(piece) if kind == "literal" and self._special_split else [piece]
            for i, part in enumerate(parts):
                special = kind == "literal" and i % 2 == 1
                if not part:
                    continue
                if not special and runs and not runs[-1][0]:
                    runs[-1] = (False, runs[-1][1] + part)
                else:
                    runs.append((special, part))
        ids: list[int] = []
        for special, text in runs:
            ids.extend([self.id_of(text)] if special else self.encode(text))
        return ids

    @cached_property
    def _special_split(self):
        import re

        specials = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(t) for t in specials) + ")") if specials else None

    def decode(self, ids: Iterable[int]) -> str:
        return self._special.decode(list(ids), skip_special_tokens=False)

    def count(self, text: str, allow_special: bool = False) -> int:
        return len(self.encode(text, allow_special))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    length: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE. Special tokens take the first ids (`<|endoftext|>` = 0).

    Digits are split one per token (common practice for code models) and whitespace runs are kept whole
    by the byte-level regex, so indentation compresses well; decoding is byte-exact.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size <= len(special_tokens) + 256:
        raise ValueError(f"vocab_size {vocab_size} must exceed 256 bytes + {len(special_tokens)} special tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer, length=length)
    return Tokenizer(tok, {"eos_token": special_tokens[0]})


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text


def compression_report(tokenizer: Tokenizer, texts: Iterable[tuple[str, str]], batch: int = 64) -> dict:
    """Bytes per token of (language, text) pairs, overall and per language, and byte-exact round-trip failures.

    Data is encoded as training encodes it (`allow_special=False`). A higher bytes/token means fewer tokens
    per file: longer context in the same window and faster generation per character.
    """
    totals: dict[str, list[int]] = {}
    failures = 0
    files = 0
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        nonlocal failures, files
        encoded = tokenizer.encode_batch([t for _, t in pending])
        for (language, text), ids in zip(pending, encoded):
            entry = totals.setdefault(language, [0, 0, 0])
            entry[0] += 1
            entry[1] += len(text.encode("utf-8"))
            entry[2] += len(ids)
            failures += tokenizer.decode(ids) != text
            files += 1
        pending.clear()

    for item in texts:
        pending.append(item)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    n_bytes = sum(v[1] for v in totals.values())
    n_tokens = sum(v[2] for v in totals.values())
    return {
        "files": files,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
        "roundtrip_failures": failures,
        "by_language": {
            k: {"files": v[0], "bytes": v[1], "tokens": v[2], "bytes_per_token": round(v[1] / v[2], 4) if v[2] else None}
            for k, v in sorted(totals.items())
        },
    }
