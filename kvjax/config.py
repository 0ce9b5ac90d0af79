"""Model configuration: one frozen dataclass for every Llama-family architecture kvjax runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# Hugging Face `architectures` / `model_type` values and the family each maps to.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3"}
_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture or settings kvjax does not implement."""


def read_json(path: Path):
    """A JSON file's contents; a file that is not valid JSON raises ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, normalised from both `rope_scaling` and `rope_parameters` layouts."""

    theta: float = 10000.0
    kind: str = "default"  # one of _ROPE_TYPES
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    attention_factor: float | None = None  # longrope: scales cos and sin

    def __post_init__(self):
        for name in ("theta", "factor", "partial_rotary_factor", "low_freq_factor", "high_freq_factor"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"rope {name} must be a finite number > 0; got {getattr(self, name)!r}")
        if self.partial_rotary_factor > 1:
            raise ValueError(f"rope partial_rotary_factor must be in (0, 1]; got {self.partial_rotary_factor}")
        if self.attention_factor is not None and (not _is_number(self.attention_factor) or self.attention_factor <= 0):
            raise ValueError(f"rope attention_factor must be a finite number > 0; got {self.attention_factor!r}")
        _check_int("rope original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is not None and not all(_is_number(v) for v in values):
                raise ValueError(f"rope {name} must be a list of finite numbers")
        if not isinstance(self.kind, str) or self.kind not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope type {self.kind!r}; kvjax implements {', '.join(_ROPE_TYPES)}"
            )
        if self.kind == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ValueError("longrope needs both 'short_factor' and 'long_factor'")
        if self.kind in ("llama3", "longrope") and self.original_max_position_embeddings is None:
            raise ValueError(f"{self.kind} rope needs 'original_max_position_embeddings'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a decoder-only Llama-family model."""

    family: str  # llama | mistral | qwen2 | phi3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None means full causal attention
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            _check_int(name, getattr(self, name))
        if not _is_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be a finite number > 0; got {self.rms_norm_eps!r}")
        for name in ("bos_token_id", "pad_token_id"):
            _check_int(name, getattr(self, name), minimum=0, optional=True)
        for token in self.eos_token_ids:
            _check_int("eos_token_ids", token, minimum=0)
        for window in self.sliding_windows:
            _check_int("sliding_windows", window, optional=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows must give one entry per layer")
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        if raw.pop("retaining_hidden", None) is not None:  # kvjax <= 0.1 kept Locret's heads in the model
            raise ValueError(
                "this config carries Locret retaining heads inside the model, which kvjax no longer "
                "does; load the heads with kvjax.policies.Locret.from_pretrained instead"
            )
        rope = raw.pop("rope")
        for key in ("short_factor", "long_factor"):
            if rope.get(key) is not None:
                rope[key] = tuple(rope[key])
        raw["sliding_windows"] = tuple(raw["sliding_windows"])
        raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
        return cls(rope=RopeConfig(**rope), **raw)


def _family(hf: dict[str, Any]) -> str:
    for arch in hf.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    named = hf.get("architectures") or model_type
    raise UnsupportedModelError(
        f"unsupported architecture {named!r}; kvjax supports {', '.join(sorted(_ARCHITECTURES))}"
    )


def _rope_from_hf(hf: dict[str, Any], family: str, head_dim: int) -> RopeConfig:
    """Reads rope settings from `rope_parameters` (transformers 5) or `rope_scaling`+`rope_theta`."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: {key} must be an object of rope settings; got {params!r}")
    params = dict(params)
    for name in ("short_factor", "long_factor"):
        if name in params and not isinstance(params[name], (list, tuple)):
            raise ValueError(f"config.json: rope {name} must be a list of numbers; got {params[name]!r}")

    def number(name: str, value) -> float:
        if not _is_number(value):
            raise ValueError(f"config.json: rope {name} must be a finite number; got {value!r}")
        return float(value)

    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if family == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's historical names for LongRoPE, as transformers maps them
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    original = hf.get("original_max_position_embeddings") if family == "phi3" else None
    original = original or params.get("original_max_position_embeddings")
    if kind in ("llama3", "longrope") and original is None:
        original = hf.get("max_position_embeddings", 4096)
    _check_int("config.json: rope original_max_position_embeddings", original, optional=True)
    factor = params.get("factor")
    if kind == "longrope" and factor is None:
        factor = hf.get("max_position_embeddings", 4096) / original
    rope = RopeConfig(
        theta=number("rope_theta", theta),
        kind=kind,
        factor=number("factor", factor if factor is not None else 1.0),
        partial_rotary_factor=number("partial_rotary_factor", partial),
        original_max_position_embeddings=original,
        low_freq_factor=number("low_freq_factor", params.get("low_freq_factor", 1.0)),
        high_freq_factor=number("high_freq_factor", params.get("high_freq_factor", 4.0)),
        short_factor=tuple(params["short_factor"]) if "short_factor" in params else None,
        long_factor=tuple(params["long_factor"]) if "long_factor" in params else None,
        attention_factor=params.get("attention_factor"),
    )
    rotary_pairs = int(head_dim * rope.partial_rotary_factor) // 2
    for name in ("short_factor", "long_factor"):
        values = getattr(rope, name)
        if values is not None and len(values) != rotary_pairs:
            raise ValueError(f"rope {name} has {len(values)} entries; expected {rotary_pairs}")
    return rope


def _layers_or_none(value, default: int) -> int:
    if value is None:
        return default
    _check_int("config.json: max_window_layers", value, minimum=0)
    return value


def _sliding_windows(hf: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if family == "llama" or window is None:
        return ()
    if family == "qwen2":
        if not hf.get("use_sliding_window", False):
            return ()
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= _layers_or_none(hf.get("max_window_layers"), num_layers) else "full_attention"
            for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (int(window),) * num_layers


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _check_hf_types(hf: dict[str, Any]) -> None:
    """Names the config.json value of the wrong type, before any arithmetic trips over it."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json lacks {key!r}")
        _check_int(f"config.json: {key}", hf[key])
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings"):
        _check_int(f"config.json: {key}", hf.get(key), optional=True)
    for key in ("rms_norm_eps", "rope_theta", "partial_rotary_factor"):
        value = hf.get(key)
        if value is not None and (not _is_number(value) or value <= 0):
            raise ValueError(f"config.json: {key} must be a finite number > 0; got {value!r}")
    for key in ("bos_token_id", "pad_token_id"):
        _check_int(f"config.json: {key}", hf.get(key), minimum=0, optional=True)
    eos = hf.get("eos_token_id")
    for token in eos if isinstance(eos, list) else [eos]:
        _check_int("config.json: eos_token_id", token, minimum=0, optional=True)
    if hf.get("sliding_window") is not None:
        _check_int("config.json: sliding_window", hf["sliding_window"])
    if not isinstance(hf.get("hidden_act", "silu"), str):
        raise ValueError(f"config.json: hidden_act must be a string; got {hf['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sliding_window"):
        if not isinstance(hf.get(key, False), (bool, type(None))):
            raise ValueError(f"config.json: {key} must be true or false; got {hf[key]!r}")
    if not isinstance(hf.get("layer_types") or [], list):
        raise ValueError(f"config.json: layer_types must be a list; got {hf['layer_types']!r}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Maps a Hugging Face config.json dictionary to a ModelConfig, naming what it cannot map."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object; got a {type(hf).__name__}")
    names = hf.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"config.json: architectures must be a list of names; got {names!r}")
    if not isinstance(hf.get("model_type", ""), (str, type(None))):
        raise ValueError(f"config.json: model_type must be a string; got {hf['model_type']!r}")
    family = _family(hf)
    _check_hf_types(hf)
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    num_layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope=_rope_from_hf(hf, family, head_dim),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(hf, family, num_layers),
        hidden_act=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def read_hf_config(path: Path) -> ModelConfig:
    """Reads `path/config.json` from a Hugging Face checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a Hugging Face checkpoint directory")
    return config_from_hf(read_json(file))
