"""Exact Llama-3 tokenization with Meta's tiktoken core, token start characters without an offsets call,
and a cache of repeated blocks.

Why it is exact: the HF tokenizer splits out added (special) tokens before its pre-tokenizer regex runs, so
the text between two special tokens is encoded on its own; this module does the same with a
``tiktoken.Encoding`` built from the same ``tokenizer.model`` and regex (tiktoken's BPE with whole-word
lookup is what ``ignore_merges=True`` reproduces in HF). Inside such a segment it also splits after a
newline that is followed by a non-whitespace character: no alternative of the Llama-3 regex
(``LLAMA3_PAT_STR``) can match across that point (a match holding a newline ends at the newline run, and
``\\s+(?!\\S)`` never sees the run's end because ``\\s*[\\r\\n]+`` is tried first), so encoding the two
sides independently gives the same ids. Those pieces (one tool definition, a system prompt, a tool
output) repeat across a suite's traces; their ids are cached by content (a dict keyed on the piece text).

Token start characters: the byte lengths of the tokens, summed, give each token's first byte; a token's
start character is the character holding that byte (what HF's offsets report). ``render_traces`` maps its
character spans with these starts.

``fast_encoder(tokenizer)`` returns a ``FastEncoder`` only when the tokenizer encodes exactly as the
Llama-3 build (same BPE model, pre-tokenizer, normalizer and added tokens); any other tokenizer (a local
model directory with a different vocabulary) gets None and the caller keeps the HF path.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from cb_core.tokenizer import LLAMA3_PAT_STR, llama3_special_tokens, llama3_tokenizer_model_path

_SPECIAL_CAND = re.compile(r"<\|[a-z0-9_]+\|>")
_SAFE_SPLIT = re.compile(r"\n\n(?=\S)")  # split point right after "\n\n" (see the module docstring)
_ZERO = np.zeros(1, np.int32)


class Unencodable(ValueError):
    """Text the byte-level path cannot take (lone surrogates): the caller falls back to the HF tokenizer."""


class FastEncoder:
    """Llama-3 ``encode`` (no BOS added; special tokens in the text are matched) with token start chars."""

    def __init__(self, max_cache_chars: int = 64_000_000) -> None:
        import tiktoken
        from llama_models.tokenizer_utils import load_bpe_file

        ranks = load_bpe_file(llama3_tokenizer_model_path())
        specials = llama3_special_tokens()
        self.special_ids = {t: 128000 + i for i, t in enumerate(specials)}
        self.enc = tiktoken.Encoding(
            name="cb-llama3", pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self._core = self.enc._core_bpe  # encode_ordinary without tiktoken's per-call Python wrapper
        lens = np.zeros(128000 + len(specials), np.int32)
        for b, r in ranks.items():
            lens[r] = len(b)
        self.byte_len = lens
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.cache_chars = 0
        self.max_cache_chars = max_cache_chars
        self.hits = self.misses = 0
        self._empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))

    # ------------------------------------------------------------------------------------------ pieces
    def _piece(self, piece: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, start char of each token relative to the piece), cached by content."""
        got = self.cache.get(piece)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        try:
            ids = self._core.encode_ordinary(piece)
        except UnicodeEncodeError as e:  # lone surrogate: HF decides what happens
            raise Unencodable(str(e)) from None
        arr = np.asarray(ids, np.int32)
        lens = self.byte_len[arr]
        bstart = np.empty(len(arr), np.int32)
        if len(arr):
            bstart[0] = 0
            np.cumsum(lens[:-1], out=bstart[1:])
        if not piece.isascii():
            raw = np.frombuffer(piece.encode("utf-8"), np.uint8)
            char_of_byte = np.cumsum((raw & 0xC0) != 0x80, dtype=np.int32)  # 1 + the character holding each byte
            char_of_byte -= 1
            bstart = char_of_byte[bstart]
        got = (arr, bstart)
        if self.cache_chars + len(piece) > self.max_cache_chars:
            self.cache.clear()
            self.cache_chars = 0
        self.cache[piece] = got
        self.cache_chars += len(piece)
        return got

    def _safe_edge(self, text: str, e: int, a: int, b: int) -> bool:
        """True when a piece may end at ``e`` inside the segment [a, b): a segment edge, or right after
        ``"\n\n"`` followed by a non-whitespace character (the split rule of the module docstring)."""
        return e == a or e == b or (e - 2 >= a and _SAFE_SPLIT.match(text, e - 2) is not None)

    def encode_with_starts(self, text: str, blocks: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
        """``text`` -> (token ids int32, start character of each token int32), equal to HF's
        ``encode(text, add_special_tokens=False)`` and ``[o[0] for o in offsets]``.

        ``blocks``: sorted, disjoint character ranges that repeat across texts (the renderer's tool
        definitions), each encoded and cached as one piece instead of one per definition; a block whose
        edges are not split points of its segment is ignored, so the ids never change."""
        ids_parts: list[np.ndarray] = []
        st_parts: list[np.ndarray] = []
        offs: list[int] = []
        special = self.special_ids
        piece = self._piece
        todo = list(blocks)

        def add(a: int, b: int) -> None:
            i, s = piece(text[a:b])
            ids_parts.append(i)
            st_parts.append(s)
            offs.append(a)

        def split(a: int, b: int) -> None:
            p = a
            for m in _SAFE_SPLIT.finditer(text, a, b):
                add(p, m.end())
                p = m.end()
            if p < b:
                add(p, b)

        def text_segment(a: int, b: int) -> None:
            while todo and todo[0][1] <= a:
                todo.pop(0)
            p = a
            while todo and todo[0][1] <= b:
                ba, bb = todo.pop(0)
                if ba >= p and bb > ba and self._safe_edge(text, ba, a, b) and self._safe_edge(text, bb, a, b):
                    if ba > p:
                        split(p, ba)
                    add(ba, bb)
                    p = bb
            if p < b:
                split(p, b)

        pos = 0
        for m in _SPECIAL_CAND.finditer(text):
            sid = special.get(m.group())
            if sid is None:
                continue
            a = m.start()
            if a > pos:
                text_segment(pos, a)
            ids_parts.append(np.array([sid], np.int32))
            st_parts.append(_ZERO)
            offs.append(a)
            pos = m.end()
        if pos < len(text):
            text_segment(pos, len(text))
        if not ids_parts:
            return self._empty
        lens = np.fromiter((len(x) for x in ids_parts), np.int64, len(ids_parts))
        ids = np.concatenate(ids_parts)
        starts = np.concatenate(st_parts)
        starts += np.repeat(np.asarray(offs, np.int32), lens)
        return ids, starts

    def __call__(self, texts, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        """The subset of the HF call that ``render`` uses; ``offset_mapping`` holds start-char arrays
        (each token's first character), not (start, end) pairs."""
        if add_special_tokens:
            raise ValueError("FastEncoder encodes without adding special tokens")
        out = [self.encode_with_starts(t) for t in texts]
        res = {"input_ids": [o[0] for o in out]}
        if return_offsets_mapping:
            res["offset_mapping"] = [o[1] for o in out]
        return res


def _encoding_state(tok) -> str:
    """The parts of a fast tokenizer's backend that decide its ids for ``add_special_tokens=False``."""
    b = json.loads(tok.backend_tokenizer.to_str())
    added = sorted(
        (a["id"], a["content"], a["special"], a["lstrip"], a["rstrip"], a["normalized"], a["single_word"])
        for a in b.get("added_tokens") or []
    )
    return json.dumps([b.get("model"), b.get("pre_tokenizer"), b.get("normalizer"), added], sort_keys=True)


@lru_cache(maxsize=1)
def _llama3_state() -> str:
    from cb_core.tokenizer import llama3_tokenizer

    return _encoding_state(llama3_tokenizer())


@lru_cache(maxsize=1)
def _llama3_id() -> str:
    from cb_core.tokenizer import llama3_tokenizer_id

    return llama3_tokenizer_id()


@lru_cache(maxsize=1)
def _shared_encoder() -> FastEncoder:
    return FastEncoder()


def is_llama3_encoding(tok) -> bool:
    """True when ``tok`` encodes exactly as the Llama-3 build (checked once per tokenizer object)."""
    flag = getattr(tok, "_cb_llama3_encoding", None)
    if flag is None:
        from cb_core.tokenizer import tokenizer_id

        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None or len(tok) != 128256:
            flag = False
        elif tokenizer_id(tok) == _llama3_id():
            flag = True  # the same build (digest of the whole backend)
        else:
            flag = _encoding_state(tok) == _llama3_state()
        try:
            tok._cb_llama3_encoding = flag
        except AttributeError:  # pragma: no cover
            pass
    return flag


def fast_encoder(tok) -> FastEncoder | None:
    """The shared ``FastEncoder`` when ``tok`` is a Llama-3 tokenizer, else None (use HF)."""
    return _shared_encoder() if is_llama3_encoding(tok) else None
