"""A thin tokenizer over the `tokenizers` library, with the subset of the HF API the engine uses.

Why not `transformers.AutoTokenizer`: in the server process it costs ~110 MB of resident memory and
several seconds of imports for the same `tokenizer.json`. Folders without a `tokenizer.json`
(slow-only tokenizers) still load through transformers.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


class FastTokenizer:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]`, `decode`, special-token ids."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self._tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.unk_token = _token_text(config.get("unk_token"))
        self.bos_token_id = self.convert_tokens_to_ids(self.bos_token)
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token)
        self.unk_token_id = self.convert_tokens_to_ids(self.unk_token)
        self.all_special_ids = sorted(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)
        template = folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else config.get("chat_template")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The model's chat template rendered as text (what concept vectors instruct the model with)."""
        if not self.chat_template or tokenize:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tk.id_to_token(i) for i in ids]

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


def load_fast_tokenizer(folder: Path):
    """`FastTokenizer` when the folder has a tokenizer.json, else transformers' AutoTokenizer."""
    if (folder / "tokenizer.json").is_file():
        return FastTokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# Text to check that cutting a text before " <letter>" and tokenizing both halves gives the tokens of
# the whole (true of byte-level BPE tokenizers; a tokenizer that adds a prefix space fails it).
_CUT_CHECK_TEXT = (
    "It's 3.14 o'clock, and the door -- opened!\nShe said: \"Hello, world.\"  Two  spaces, a\ttab,\n\n"
    "new paragraph; naïve café déjà vu — emoji 🙂 end. Numbers 12345 and x2 y3 don't matter I'd say.\n"
)


_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")


def cut_points(text: str, start: int = 0, end: int | None = None) -> list[int]:
    """Positions in [start, end) where a text may be cut for tokenizing in two halves: a space after
    a non-space and before a letter (byte-level BPE pre-tokenizers split there, whatever follows)."""
    end = len(text) if end is None else min(end, len(text))
    return [m.start() for m in _CUT.finditer(text, start, end + 1) if m.start() < end]


class TypingTokenizer:
    """Token ids of a document that changes at its end, re-tokenizing only the end.

    Why: every keystroke tokenizes the whole window before the cursor (~3 ms at 2,048 tokens) though
    typing changes only its last characters. Per document this keeps the tokens of a head of the text
    that ends at a safe cut (`cut_points`) at least `margin` characters before the end; a new text
    that still starts with that head tokenizes only what follows it. A tokenizer for which cutting
    changes the tokens of a sample text (`_CUT_CHECK_TEXT`) is never cut.
    """

    def __init__(self, encode: Callable[[str], list[int]], margin: int = 256, documents: int = 16):
        self.encode = encode
        self.margin = margin
        self.documents = documents
        self._heads: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()
        whole = encode(_CUT_CHECK_TEXT)
        self.exact = all(encode(_CUT_CHECK_TEXT[:i]) + encode(_CUT_CHECK_TEXT[i:]) == whole
                         for i in cut_points(_CUT_CHECK_TEXT))

    def __call__(self, document: str, text: str) -> list[int]:
        if not self.exact:
            return self.encode(text)
        head, head_ids = self._heads.pop(document, ("", []))
        if not text.startswith(head):
            head, head_ids = "", []
        cut = len(head)
        if len(text) - cut > 2 * self.margin:  # move the head forward: it covers text typed since
            cuts = cut_points(text, cut, len(text) - self.margin)
            if cuts and cuts[-1] > cut:
                head_ids = head_ids + self.encode(text[cut: cuts[-1]])
                head, cut = text[: cuts[-1]], cuts[-1]
        self._heads[document] = (head, head_ids)
        while len(self._heads) > self.documents:
            self._heads.popitem(last=False)
        return head_ids + self.encode(text[cut:])

    def forget(self, document: str) -> None:
        self._heads.pop(document, None)
