"""Generation: skeleton -> prompt (the project's renderer) -> sample (a backend) -> parse -> judge -> trace_v1.

* ``backends``: ``SamplingConfig``, ``Completion``, the ``GenerationBackend`` protocol, ``make_backend``.
* ``parse``: ``parse_completion`` -- tool calls, final answer or a parse failure with its reason.
* ``judge``: the rule-based tool-flip judge (and an optional LLM judge through the same backends).
* ``completions``: DS / DR / adversarial-safe completions, kept and rejected, with sharded resume.
"""
from cb_core.generate.backends import (  # noqa: F401
    Completion,
    GenerationBackend,
    SamplingConfig,
    TransformersBackend,
    make_backend,
    prompt_ids,
    prompt_text,
)
