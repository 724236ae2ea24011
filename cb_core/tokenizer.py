"""Tokenizers: a local HF model directory, or the real Llama-3 tokenizer built offline.

The offline build converts Meta's tiktoken ``tokenizer.model`` (shipped inside the ``llama-models`` PyPI
package) with transformers' ``TikTokenConverter`` into a fast (Rust) tokenizer, adds the 256 Llama-3
special tokens at their exact ids, and caches the result on disk (``save_pretrained``; written to a temp
dir and renamed into place, so concurrent builders never see a half-written cache). Nothing here touches
the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import PreTrainedTokenizerFast  # noqa: E402

# Meta's Llama-3 pre-tokenizer regex (llama_models.llama3.tokenizer.Tokenizer.pat_str).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 128000
NUM_SPECIAL_TOKENS = 256

# Named special tokens and their ids: cb_core.schemas (the one place), re-exported here.
from cb_core.schemas import (  # noqa: E402,F401
    BOS,
    END_HEADER,
    END_HEADER_ID,
    EOM,
    EOT,
    LLAMA3_SPECIAL_IDS,
    PYTHON_TAG,
    START_HEADER,
    START_HEADER_ID,
)

_CACHE_FORMAT = "llama3-tiktoken-v2"  # bump when the build recipe changes


def llama3_special_tokens() -> list[str]:
    """All 256 special tokens in id order (128000 .. 128255)."""
    by_id = {v: k for k, v in LLAMA3_SPECIAL_IDS.items()}
    out, reserved = [], 0
    for i in range(NUM_BASE_TOKENS, NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS):
        if i in by_id:
            out.append(by_id[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def llama3_tokenizer_model_path() -> Path:
    """Meta's tiktoken file inside the installed llama-models package."""
    try:
        import llama_models
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise RuntimeError("the llama-models package is required to build the Llama-3 tokenizer") from e
    base = Path(llama_models.__file__).resolve().parent
    for cand in (base / "llama3" / "tokenizer.model", base / "models" / "llama3" / "tokenizer.model"):
        if cand.is_file():
            return cand
    found = sorted(base.rglob("llama3*/tokenizer.model"))
    if not found:
        raise FileNotFoundError(f"no llama3 tokenizer.model under {base}")
    return found[0]


def default_cache_dir() -> Path:
    root = os.environ.get("CB_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "cb_platform"
    return base / "llama3_tokenizer"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_llama3_tokenizer(model_path: Path | None = None) -> PreTrainedTokenizerFast:
    """Convert tokenizer.model -> fast tokenizer (no cache). Takes a few seconds."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_path = model_path or llama3_tokenizer_model_path()
    specials = llama3_special_tokens()
    conv = TikTokenConverter(vocab_file=str(model_path), pattern=LLAMA3_PAT_STR, extra_special_tokens=None)
    backend = conv.converted()
    backend.model.ignore_merges = True  # exact parity with tiktoken (measured)
    n_base = backend.get_vocab_size(with_added_tokens=False)
    if n_base != NUM_BASE_TOKENS:
        raise ValueError(f"{model_path}: expected {NUM_BASE_TOKENS} base tokens, got {n_base}")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # as Meta's HF release: add_special_tokens=True prepends <|begin_of_text|>
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, LLAMA3_SPECIAL_IDS[BOS])],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,  # Llama-3.1-Instruct's generation end
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    check_llama3_special_ids(tok)
    return tok


def check_llama3_special_ids(tok) -> None:
    """Raise if any Llama-3 special token is missing or at the wrong id, or the vocab is not 128256."""
    bad = {t: tok.convert_tokens_to_ids(t) for t, i in LLAMA3_SPECIAL_IDS.items() if tok.convert_tokens_to_ids(t) != i}
    if bad:
        raise ValueError(f"Llama-3 special tokens at wrong ids: {bad}")
    if len(tok) != NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS:
        raise ValueError(f"Llama-3 vocab must be {NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS}, got {len(tok)}")
    enc = tok.encode(START_HEADER + "assistant" + END_HEADER + EOT, add_special_tokens=False)
    if enc[0] != START_HEADER_ID or enc[-2:] != [END_HEADER_ID, LLAMA3_SPECIAL_IDS[EOT]]:
        raise ValueError(f"special tokens are not matched in text: {enc}")


def llama3_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The real Llama-3 fast tokenizer, built offline from llama-models' tokenizer.model and cached.

    Cache: ``cache_dir`` or ``$CB_CACHE_DIR/llama3_tokenizer`` or ``~/.cache/cb_platform/llama3_tokenizer``.
    The cache is keyed on the source file's sha256 and the build recipe version; stale caches are rebuilt.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    src = llama3_tokenizer_model_path()
    stamp = _build_stamp(src)
    saved = _current_stamp(cache, stamp)
    if saved is not None:
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(cache), local_files_only=True)
            check_llama3_special_ids(tok)
            if saved.get("tokenizer_id"):
                tok._cb_tokenizer_id = saved["tokenizer_id"]  # digest computed at build time (saves ~2 s)
            return tok
        except Exception:  # corrupt cache: rebuild below
            pass
    tok = build_llama3_tokenizer(src)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / "cb_build.json").write_text(json.dumps({**stamp, "tokenizer_id": tokenizer_id(tok)}))
        old = None
        if cache.exists():
            old = cache.parent / f".{cache.name}.old.{os.getpid()}"
            os.replace(cache, old)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race: theirs is as good as ours
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def llama3_tokenizer_id(cache_dir: str | Path | None = None) -> str:
    """``tokenizer_id(llama3_tokenizer())`` without building a tokenizer when the cache is current: its stamp
    holds the digest computed at build time (the one a loaded cache is given). Checking whether some
    tokenizer is the Llama-3 build used to load a second copy for this: ~1 s and ~200 MB of freed heap a
    process, which also made every later fork copy that much more page table."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    saved = _current_stamp(cache, _build_stamp(llama3_tokenizer_model_path()))
    if saved is not None and saved.get("tokenizer_id"):
        return saved["tokenizer_id"]
    return tokenizer_id(llama3_tokenizer(cache_dir))


def _build_stamp(src: Path) -> dict:
    """What names a cached build: the cache format and the digest of the ``tokenizer.model`` it came from."""
    return {"format": _CACHE_FORMAT, "source_sha256": _file_sha256(src)}


def _current_stamp(cache: Path, stamp: dict) -> dict | None:
    """The cache's ``cb_build.json`` when it names this build (``stamp``'s format and source digest), else
    None (no cache, a stale one, or an unreadable stamp)."""
    try:
        saved = json.loads((cache / "cb_build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or {k: saved.get(k) for k in stamp} != stamp:
        return None
    return saved


def load_tokenizer(spec: str | Path):
    """``"llama3"`` -> the offline Llama-3 build; otherwise a local HF model/tokenizer directory."""
    if str(spec) == "llama3":
        return llama3_tokenizer()
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer '{spec}' is neither 'llama3' nor a local model directory (no hub access at run time)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path}: a fast tokenizer is required (offsets mapping)")
    if tok.convert_tokens_to_ids(START_HEADER) == LLAMA3_SPECIAL_IDS[START_HEADER]:
        check_llama3_special_ids(tok)
    return tok


def tokenizer_id(tok) -> str:
    """Stable digest of the tokenizer's behaviour-defining state (backend JSON: vocab, merges, regex,
    added tokens), e.g. ``llama3-1a2b3c4d5e6f7a8b``. Equal tokenizers give equal ids across processes."""
    cached = getattr(tok, "_cb_tokenizer_id", None)
    if cached:
        return cached
    backend = json.loads(tok.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    blob = json.dumps(backend, sort_keys=True, ensure_ascii=False).encode("utf-8")
    h = hashlib.sha256(blob).hexdigest()[:16]
    name = "llama3" if tok.convert_tokens_to_ids(START_HEADER) == START_HEADER_ID else "tok"
    out = f"{name}-{h}"
    try:
        tok._cb_tokenizer_id = out
    except AttributeError:  # pragma: no cover
        pass
    return out
