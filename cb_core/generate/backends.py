"""Generation backends behind one interface: token ids in (rendered by ``cb_core.render``), completions out.

Every backend takes prompts as token-id lists the project's own renderer produced (``render_conversation``
emits ``<|begin_of_text|>`` itself, so prompts are tokenized with ``add_special_tokens=False``: no second
BOS) ending on an assistant header, and returns for each prompt ``n`` completions whose ``text`` is decoded
*keeping* special tokens, so ``<|python_tag|>`` (and the end token) survive for the parser.

* ``TransformersBackend``: batched, left-padded, KV cache (``model.generate``), CPU or GPU, stops on
  ``<|eot_id|>`` / ``<|eom_id|>``; sampling seeded per batch (``torch.manual_seed(seed + batch index)`` under
  a saved-and-restored RNG state), so a fixed seed and batch composition reproduces the same tokens.
* ``vllm`` (``cb_core.generate.vllm_backend.VllmBackend``, optional extra, imported lazily).

``make_backend(kind, ...)`` is the one constructor the assets, the judge and evaluation use.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

BACKEND_KINDS = ("transformers", "vllm")
STOP_REASONS = ("stop", "length")
# <|eot_id|>, <|eom_id|>, <|end_of_text|>: an assistant turn ends on one of these.
DEFAULT_STOP_IDS = (128009, 128008, 128001)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    n: int = 1  # completions per prompt

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    text: str  # decoded with special tokens kept (the end token included when the model emitted one)
    token_ids: list[int] = field(default_factory=list)  # generated ids only (no prompt, no padding)
    stop_reason: str = "stop"  # "stop" (eot/eom/eos emitted) | "length" (max_tokens reached)


@runtime_checkable
class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, in prompt order."""
        ...


# ------------------------------------------------------------------------------------------ transformers
class TransformersBackend:
    """HF ``generate`` over left-padded batches with the KV cache.

    ``batch_size`` prompts per forward batch (each expanded ``n`` times for sampling), and at most
    ``max_batch_tokens`` padded prompt tokens per batch. Prompts are sorted by length inside a call so a batch
    pads little; results come back in the caller's order. The seed of batch k is ``sampling.seed + k`` where
    batches are formed over that length-sorted order, so the same prompts,
    seed and batch size give the same tokens (a different batch size may change the sampled tokens: padding
    changes the float arithmetic, as in any batched engine).
    """

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        device: str | None = None,
        stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
        sort_by_length: bool = True,
        max_batch_tokens: int = 8192,
    ):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        if device is None:
            device = str(next(model.parameters()).device)
        self.device = torch.device(device)
        if next(model.parameters()).device != self.device:
            self.model = model.to(self.device)
        self.model.eval()
        self.stop_ids = [int(i) for i in stop_ids]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self.sort_by_length = sort_by_length
        self.max_batch_tokens = max(1, int(max_batch_tokens))

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if self.sort_by_length else list(
            range(len(prompts))
        )
        out: list[list[Completion] | None] = [None] * len(prompts)
        for k, idx in enumerate(self._batches(order, [len(p) for p in prompts])):
            res = self._generate_batch([prompts[i] for i in idx], sampling, sampling.seed + k)
            for i, comps in zip(idx, res):
                out[i] = comps
        return out  # type: ignore[return-value]

    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Consecutive prompts of ``order``, at most ``batch_size`` per batch and at most ``max_batch_tokens``
        padded prompt tokens (rows x longest): one long prompt never makes seven short ones pad to its length
        (on CPU a padded batch of long prompts is slower than the same prompts one by one)."""
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in order:
            m = max(longest, lengths[i])
            if cur and (len(cur) >= self.batch_size or m * (len(cur) + 1) > self.max_batch_tokens):
                batches.append(cur)
                cur, m = [], lengths[i]
            cur.append(i)
            longest = m
        if cur:
            batches.append(cur)
        return batches

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig, seed: int) -> list[list[Completion]]:
        import torch

        L = max(len(p) for p in batch)
        ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), L), dtype=torch.long)
        for r, p in enumerate(batch):  # left padding: the last prompt token sits at position L-1 for every row
            ids[r, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            att[r, L - len(p) :] = 1
        n_gen = 1 if sampling.greedy else sampling.n  # greedy: n identical completions, computed once
        kw: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            num_return_sequences=n_gen,
        )
        if sampling.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=0)
        devices = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else []
        with torch.random.fork_rng(devices=devices, enabled=not sampling.greedy), torch.inference_mode():
            if not sampling.greedy:
                torch.manual_seed(int(seed))
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=att.to(self.device), **kw
            )
        new = gen[:, L:].tolist()
        stops = set(self.stop_ids)
        results: list[list[Completion]] = []
        for r in range(len(batch)):
            comps = []
            for j in range(sampling.n):
                toks = new[r * n_gen + (j if n_gen > 1 else 0)]
                cut = next((t + 1 for t, tok in enumerate(toks) if tok in stops), None)
                if cut is not None:
                    toks, reason = toks[:cut], "stop"
                else:
                    # generate pads finished rows; an unfinished row simply ran out of tokens
                    reason = "length"
                text = self.tokenizer.decode(toks, skip_special_tokens=False)
                comps.append(Completion(text=text, token_ids=[int(t) for t in toks], stop_reason=reason))
            results.append(comps)
        return results


# ----------------------------------------------------------------------------------------------- factory
def make_backend(kind: str, *, model=None, model_dir=None, tokenizer=None, **kw) -> GenerationBackend:
    """``"transformers"`` (needs ``model`` and ``tokenizer``; or ``model_dir``, loaded locally) or ``"vllm"``
    (``model_dir``: an HF ``save_pretrained`` directory; lazy import of the optional extra). Extra keywords
    go to the backend's constructor (``batch_size``, ``device``, ``tensor_parallel_size``...)."""
    if kind == "transformers":
        if model is None:
            if model_dir is None:
                raise ValueError("transformers backend: pass model= (a loaded model) or model_dir=")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
        if tokenizer is None:
            if model_dir is None:
                raise ValueError("transformers backend: pass tokenizer= (or model_dir= holding one)")
            from cb_core.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(str(model_dir))
        return TransformersBackend(model, tokenizer, **kw)
    if kind == "vllm":
        try:
            from cb_core.generate.vllm_backend import VllmBackend
        except ImportError as e:
            raise ImportError(
                f"vllm backend unavailable ({e}); install the optional extra in its own venv (see README)"
            ) from e
        return VllmBackend(model=model, model_dir=model_dir, tokenizer=tokenizer, **kw)
    raise ValueError(f"unknown backend {kind!r}; choose one of {BACKEND_KINDS}")


# ------------------------------------------------------------------------------------------------ prompts
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def prompt_text(messages: Sequence[dict], tools: Any = None, render_cfg=None, *, prefill: str = "") -> str:
    """The conversation rendered by ``cb_core.render.render_conversation`` (BOS included once), ending on
    an open assistant header (``add_generation_prompt``), optionally followed by ``prefill`` (the start of
    the assistant turn, e.g. a forced call's ``<|python_tag|>{"name": ...``)."""
    from cb_core.render import render_conversation

    return render_conversation(messages, tools, render_cfg).text + ASSISTANT_HEADER + prefill


def prompt_ids(tokenizer, messages: Sequence[dict], tools: Any = None, render_cfg=None, *, prefill: str = "") -> list[int]:
    """Token ids of ``prompt_text`` (``add_special_tokens=False``: the renderer already wrote the BOS)."""
    return list(tokenizer(prompt_text(messages, tools, render_cfg, prefill=prefill), add_special_tokens=False)["input_ids"])
