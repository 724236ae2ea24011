"""Moved to ``cb_core.parse`` (the parser sits below render, generation and evaluation); this name stays for
callers not yet updated."""
from cb_core.parse import *  # noqa: F401,F403
from cb_core.parse import ParsedCompletion, parse_completion, tool_calls  # noqa: F401
