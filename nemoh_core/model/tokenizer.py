"""The checkpoint's own tokenizer, loaded offline from `tokenizer.json` with the tokenizers library."""

from __future__ import annotations

from pathlib import Path

from nemoh.errors import NemohError


class Tokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise NemohError("the tokenizers package is needed for text input: pip install 'nemoh[ref]'") from None
        f = path / "tokenizer.json"
        if not f.is_file():
            raise NemohError(f"{f}: no such file (this checkpoint has no tokenizer; pass token ids instead)")
        try:
            self._tok = _Tok.from_file(str(f))
        except Exception as e:
            raise NemohError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0]})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # with the checkpoint's own special tokens (e.g. <s>)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(Path(path))
