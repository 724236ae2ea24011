"""Models: model profiles (configs/models/*.yaml), the tiny random-weight demo model, and local HF models.

No hub access: local directories are loaded with ``local_files_only=True``.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cb_core.config import (  # noqa: F401  (PROJECT_ROOT re-exported)
    PROJECT_ROOT,
    ConfigError,
    ConfigFileNotFound,
    check_bool,
    check_keys,
    check_mapping,
    check_str,
    display_path,
    load_yaml,
    named_config,
    nullable,
    one_of,
    whole,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def peft_wrap_quiet() -> Iterator[None]:
    """Around wrapping a model in peft (a LoRA, a saved adapter): peft reads ``model.is_gradient_checkpointing``,
    which transformers 5 deprecates with a FutureWarning on every wrap, noise in every training and eval log
    that a user cannot act on. Only that warning is silenced, and only inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass
class ModelProfile:
    """One configs/models/<name>.yaml. ``model`` is "tiny" (random weights), "local" (``path``) or "tiny_agent"
    (the project's fine-tuned tiny agent, built and cached by ``cb_core.generate.tiny_agent``; ``build``)."""

    name: str
    tokenizer: str = "llama3"  # "llama3" (offline build) or a local tokenizer/model directory
    model: str = "tiny"  # tiny | local | tiny_agent
    path: str | None = None  # local HF model directory (model == "local")
    seed: int = 0
    max_length: int = 4096
    tool_call_format: str = "python_tag"  # python_tag | json
    tools_in_user_message: bool = True
    date_string: str = "26 Jul 2024"
    torch_dtype: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides for the tiny model
    build: dict[str, Any] = field(default_factory=dict)  # tiny_agent: TinyAgentConfig fields (cache key)
    truncation: dict[str, Any] | None = None  # traces over max_length (cb_core.render.TruncationConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "ModelProfile":
        """A profile from its file's mapping: every key checked by ``PROFILE_RULES``, errors naming ``source``
        (the file) and the key."""
        check_keys(raw, PROFILE_RULES, source)
        for key, val in raw.items():
            PROFILE_RULES[key](val, f"{source}: {key}")
        from cb_core.render import TruncationConfig

        try:  # its messages name truncation.<key> after the file (the line of that key)
            TruncationConfig.from_dict(raw.get("truncation"), source=source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            return cls(**raw)
        except ValueError as e:  # the checks of __post_init__ (model needs path): "model ..." names the key
            msg = str(e).removeprefix(f"model profile {raw.get('name')}: ")
            raise ConfigError(f"{source}: {msg}") from None

    def __post_init__(self) -> None:
        if self.model not in ("tiny", "local", "tiny_agent"):
            raise ValueError(
                f"model profile {self.name}: model must be 'tiny', 'local' or 'tiny_agent', got {self.model!r}"
            )
        if self.tool_call_format not in ("python_tag", "json"):
            raise ValueError(f"model profile {self.name}: tool_call_format must be python_tag|json")
        if self.model == "local" and not self.path:
            raise ValueError(f"model profile {self.name}: model 'local' needs a path")
        from cb_core.render import TruncationConfig

        TruncationConfig.from_dict(self.truncation, source=f"model profile {self.name}")  # fail at load

    @property
    def resolved_path(self) -> Path | None:
        if self.model == "tiny_agent" and not self.path:
            from cb_core.generate.tiny_agent import tiny_agent_dir

            return tiny_agent_dir(self.build or None)  # built on first use, then cached
        if not self.path:
            return None
        p = Path(os.path.expanduser(self.path))
        return p if p.is_absolute() else PROJECT_ROOT / p

    def render_config(self):
        from cb_core.render import RenderConfig, TruncationConfig

        return RenderConfig(
            tool_call_format=self.tool_call_format,
            tools_in_user_message=self.tools_in_user_message,
            date_string=self.date_string,
            max_length=self.max_length,
            truncation=TruncationConfig.from_dict(self.truncation, source=f"model profile {self.name}"),
        )


def _date_text(v: Any, w: str) -> str:
    """An unquoted 2024-07-26 is a YAML date, not the text the template prints."""
    if not isinstance(v, str):
        raise ConfigError(f"{w} must be a quoted text like \"26 Jul 2024\", got {v!r} ({type(v).__name__})")
    return check_str(v, w)


# configs/models/*.yaml: key -> check(value, where); one per ModelProfile field (a test checks it)
PROFILE_RULES: dict[str, Any] = {
    "name": check_str,
    "tokenizer": check_str,
    "model": one_of(("tiny", "local", "tiny_agent")),
    "path": nullable(check_str),
    "seed": whole(0),
    "max_length": whole(1),
    "tool_call_format": one_of(("python_tag", "json")),
    "tools_in_user_message": check_bool,
    "date_string": _date_text,
    "torch_dtype": nullable(one_of(("bfloat16", "float16", "float32", "float64"))),
    "overrides": check_mapping,
    "build": check_mapping,
    "truncation": nullable(check_mapping),  # its keys: cb_core.render.TruncationConfig (in __post_init__)
}


def models_dir() -> Path:
    from cb_core.config import config_dir

    return config_dir() / "models"


def profile_name(default: str = "tiny") -> str:
    """The model profile in effect: $CB_MODEL, else ``default`` (the one place CB_MODEL is read)."""
    return os.environ.get("CB_MODEL") or default


def load_profile(name_or_path: str | Path | None = None) -> ModelProfile:
    """A profile by name (configs/models/<name>.yaml) or YAML path. Default: $CB_MODEL or "tiny".
    ``CB_MODEL_PATH`` overrides the profile's ``path`` (the directory is looked for when the model is loaded,
    as for ``path``). Problems are ConfigErrors naming the file and key (``CB_MODEL`` when the missing profile
    is the one it names); a missing profile is also a FileNotFoundError."""
    spec = str(name_or_path or profile_name())
    from_env = spec == os.environ.get("CB_MODEL")  # also when a caller passes profile_name() on (ModelResource)
    what = "environment variable CB_MODEL: model profile" if from_env else "model profile"
    path = named_config("models", spec, what, error=ConfigFileNotFound).resolve()  # as read_config names it
    raw = load_yaml(path)
    raw.setdefault("name", path.stem)
    if os.environ.get("CB_MODEL_PATH"):
        raw["path"] = check_str(os.environ["CB_MODEL_PATH"], "environment variable CB_MODEL_PATH")
    return ModelProfile.from_dict(raw, display_path(path))


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A tiny random-weight ``LlamaForCausalLM`` with the tokenizer's full vocabulary (128256 for Llama-3).

    Deterministic for a given seed. hidden 128, 4 layers, 4 heads x head_dim 32, MLP 256 by default.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY_CONFIG)
    cfg.update(overrides)
    pad = tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        **cfg,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model


def profile_depth(profile: ModelProfile | str) -> int | None:
    """The profile's decoder depth without loading weights: the tiny model's config, the tiny agent's build
    config, a local directory's config.json; None where it cannot be known here (a path not on this machine)."""
    try:
        if isinstance(profile, str):
            profile = load_profile(profile)
        if profile.model == "tiny":
            return int({**TINY_CONFIG, **profile.overrides}["num_hidden_layers"])
        if profile.model == "tiny_agent" and not profile.path:
            from cb_core.generate.tiny_agent import TinyAgentConfig

            return int(TinyAgentConfig.from_dict(profile.build or None).model["num_hidden_layers"])
        path = profile.resolved_path
        raw = json.loads((path / "config.json").read_text(encoding="utf-8")) if path else {}
        n = raw.get("num_hidden_layers", (raw.get("text_config") or {}).get("num_hidden_layers"))
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def load_model(profile: ModelProfile | str, tokenizer=None):
    """The profile's model: the tiny random one, or a local HF directory (``local_files_only``)."""
    if isinstance(profile, str):
        profile = load_profile(profile)
    if profile.model == "tiny":
        if tokenizer is None:
            from cb_core.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(profile.tokenizer)
        return tiny_llama(tokenizer, seed=profile.seed, **profile.overrides)
    if profile.model == "tiny_agent" and not profile.path:
        from cb_core.generate.tiny_agent import load_tiny_agent

        return load_tiny_agent(profile.build or None)[0]
    import torch
    from transformers import AutoModelForCausalLM

    path = profile.resolved_path
    if path is None or not path.is_dir():
        origin = ("from the environment variable CB_MODEL_PATH, which replaces the profile's path"
                  if os.environ.get("CB_MODEL_PATH")
                  else f"the profile's `path` (configs/models/{profile.name}.yaml): fix it or set CB_MODEL_PATH")
        raise FileNotFoundError(
            f"model profile {profile.name}: local model directory {path} does not exist "
            f"({origin}; no hub downloads at run time)"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if profile.torch_dtype:
        kwargs["dtype"] = getattr(torch, profile.torch_dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_profile_tokenizer(profile: ModelProfile | str):
    """The tokenizer a profile names ("llama3" or a local dir; "model" means the model's own directory)."""
    from cb_core.tokenizer import load_tokenizer

    if isinstance(profile, str):
        profile = load_profile(profile)
    spec = profile.tokenizer
    if spec == "model":
        spec = str(profile.resolved_path)
    return load_tokenizer(spec)
