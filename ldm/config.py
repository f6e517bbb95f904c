"""Typed model configs read from CompVis-format yaml files.

CompVis builds its models with ``instantiate_from_config`` (``target:`` import strings); here the yaml
is plain data: the architecture keys are read into small frozen dataclasses and everything else
(targets, training settings, loss configs) is ignored. No code named in a yaml is ever imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import OmegaConf

from ldm.errors import ConfigError
from ldm.messages import escaped, one_line
from ldm.regular_files import read_utf8_text

REPO_ROOT = Path(__file__).resolve().parent.parent  # configs/ and models/ (the shipped tokenizer) live here
DEFAULT_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
INPAINTING_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"  # 9-channel UNet


MAX_CONFIG_BYTES = 2**20  # CompVis' configs are ~2 KB
MAX_YAML_EVENTS = 100_000
MAX_YAML_DEPTH = 32
# CLIP's tokenizer has 49,408 ids; transformers' activations that CLIP configs use.
TOKENIZER_VOCAB = 49408
TEXT_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")




def _int_in(low: int, high: int, also: tuple[int, ...] = ()):
    def check(value: Any) -> str | None:
        if type(value) is not int:
            return f"{escaped(value, 40)} (expected a whole number)"
        if not (low <= value <= high or value in also):
            extra = "".join(f"{a} or " for a in also)
            return f"{value} (expected {extra}{low} to {high})"
        return None

    return check


def _ints_in(low: int, high: int, min_len: int, max_len: int):
    def check(value: Any) -> str | None:
        if type(value) is not tuple or not min_len <= len(value) <= max_len:
            return f"{escaped(value, 40)} (expected a list of {min_len} to {max_len} whole numbers)"
        bad = [v for v in value if type(v) is not int or not low <= v <= high]
        return f"{escaped(value, 40)} (each must be {low} to {high})" if bad else None

    return check


def _float_in(low: float, high: float):
    def check(value: Any) -> str | None:
        if type(value) not in (int, float) or not math.isfinite(value) or not low < value < high:
            return f"{escaped(value, 40)} (expected a number between {low} and {high})"
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if type(value) is bool else f"{escaped(value, 40)} (expected true or false)"


def _one_of(*choices: str):
    def check(value: Any) -> str | None:
        return None if value in choices and type(value) is str else f"{escaped(value, 40)} (expected one of {', '.join(choices)})"

    return check


def _field_errors(config: Any, section: str, checks: dict[str, Any]) -> list[str]:
    """One ``section.field: value (expected ...)`` per field that fails its check."""
    errors = []
    for name, check in checks.items():
        problem = check(getattr(config, name))
        if problem:
            errors.append(f"{section}.{name}: {problem}")
    return errors


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise ConfigError("; ".join(errors))


@dataclass(frozen=True)
class UNetConfig:
    """``unet_config.params`` of CompVis' ``openaimodel.UNetModel`` (the keys inference needs)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    use_spatial_transformer: bool = True
    legacy: bool = False

    def __post_init__(self) -> None:
        errors = _field_errors(self, "unet_config", {
            "in_channels": _int_in(1, 64), "out_channels": _int_in(1, 64), "model_channels": _int_in(1, 4096),
            "attention_resolutions": _ints_in(1, 1024, 0, 8), "num_res_blocks": _int_in(1, 8),
            "channel_mult": _ints_in(1, 16, 1, 8), "num_heads": _int_in(1, 128, also=(-1,)),
            "num_head_channels": _int_in(1, 1024, also=(-1,)), "transformer_depth": _int_in(1, 16),
            "context_dim": _int_in(1, 8192), "use_spatial_transformer": _boolean, "legacy": _boolean,
        })
        _raise_if(errors)
        if not self.use_spatial_transformer:
            raise ConfigError("only text-conditioned UNets (use_spatial_transformer: True) are supported")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("unet_config needs num_heads or num_head_channels")
        for channels in sorted({self.model_channels * mult for mult in self.channel_mult}):
            if channels % 32:
                errors.append(f"unet_config: {channels} channels at a level is not a multiple of 32 (GroupNorm's groups)")
            divisor = self.num_heads if self.num_head_channels == -1 else self.num_head_channels
            if channels % divisor:
                errors.append(f"unet_config: {channels} channels at a level do not split into heads of {divisor}")
        _raise_if(errors)

    def attention_shape(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of the transformer at a level with ``channels`` channels, as CompVis computes it."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            head_dim = channels // heads
        else:
            heads = channels // self.num_head_channels
            head_dim = self.num_head_channels
        if self.legacy:
            head_dim = channels // heads
        return heads, head_dim


@dataclass(frozen=True)
class VAEConfig:
    """``first_stage_config.params`` of CompVis' ``AutoencoderKL`` (embed_dim plus its ddconfig)."""

    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True

    def __post_init__(self) -> None:
        errors = _field_errors(self, "first_stage_config", {
            "embed_dim": _int_in(1, 64), "z_channels": _int_in(1, 64), "in_channels": _int_in(1, 4),
            "out_ch": _int_in(1, 4), "ch": _int_in(1, 1024), "ch_mult": _ints_in(1, 16, 1, 8),
            "num_res_blocks": _int_in(1, 8), "attn_resolutions": _ints_in(1, 8192, 0, 8),
            "resolution": _int_in(1, 8192), "double_z": _boolean,
        })
        _raise_if(errors)
        for channels in sorted({self.ch * mult for mult in self.ch_mult}):
            if channels % 32:
                errors.append(f"first_stage_config: {channels} channels at a level is not a multiple of 32 (GroupNorm's groups)")
        _raise_if(errors)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP ViT-L/14's text tower, in ``transformers.CLIPTextConfig`` field names."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        errors = _field_errors(self, "cond_stage_config", {
            "vocab_size": _int_in(TOKENIZER_VOCAB, 1_000_000), "hidden_size": _int_in(1, 8192),
            "intermediate_size": _int_in(1, 65536), "num_hidden_layers": _int_in(1, 48),
            "num_attention_heads": _int_in(1, 128), "max_position_embeddings": _int_in(77, 1024),
            "hidden_act": _one_of(*TEXT_ACTIVATIONS), "projection_dim": _int_in(1, 8192),
            "layer_norm_eps": _float_in(0.0, 1.0),
        })
        _raise_if(errors)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"cond_stage_config: hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads")


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule of ``LatentDiffusion``: ``linear`` betas are linspace(sqrt(b0), sqrt(b1))**2."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    beta_schedule: str = "linear"
    parameterization: str = "eps"

    def __post_init__(self) -> None:
        _raise_if(_field_errors(self, "model.params", {
            "timesteps": _int_in(2, 10000), "linear_start": _float_in(0.0, 1.0), "linear_end": _float_in(0.0, 1.0),
            "beta_schedule": lambda v: None if type(v) is str else f"{escaped(v, 40)} (expected a name)",
            "parameterization": lambda v: None if type(v) is str else f"{escaped(v, 40)} (expected a name)",
        }))
        if self.linear_start >= self.linear_end:
            raise ConfigError(f"model.params: linear_start {self.linear_start} must be below linear_end {self.linear_end}")
        if self.beta_schedule not in ("linear", "sqrt_linear", "sqrt", "cosine"):
            raise ConfigError(f"unknown beta_schedule {self.beta_schedule!r} (linear, sqrt_linear, sqrt or cosine)")
        if self.parameterization != "eps":
            raise ConfigError(f"parameterization {self.parameterization!r} is not supported (SD v1 predicts eps)")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build and run an SD v1-style latent diffusion model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        errors = _field_errors(self, "model.params", {"scale_factor": _float_in(0.0, 100.0)})
        if self.unet.context_dim != self.text.hidden_size:
            errors.append(f"unet_config.context_dim {self.unet.context_dim} differs from the text encoder's hidden_size {self.text.hidden_size}")
        if self.unet.out_channels != self.vae.embed_dim:
            errors.append(f"unet_config.out_channels {self.unet.out_channels} differs from the VAE's embed_dim {self.vae.embed_dim}")
        if self.unet.in_channels < self.vae.embed_dim:
            errors.append(f"unet_config.in_channels {self.unet.in_channels} is below the VAE's embed_dim {self.vae.embed_dim}")
        _raise_if(errors)

    @property
    def latent_channels(self) -> int:
        # The UNet's output: an inpainting UNet takes 9 channels (latent, mask, masked image) but denoises 4.
        return self.unet.out_channels

    @property
    def downsampling_factor(self) -> int:
        return self.vae.downsampling_factor


def _pick(cls: type, params: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from the keys of ``params`` it knows; lists become tuples."""
    known = {f.name for f in fields(cls)}
    kwargs = {key: tuple(value) if type(value) is list else value for key, value in params.items() if key in known}
    return cls(**kwargs)


def _section(data: Any, *keys: str, required: bool = True) -> dict:
    """``data[k1][k2]...`` as a dict; a missing optional section is empty, anything else not a dict an error."""
    for depth, key in enumerate(keys):
        value = data.get(key) if isinstance(data, dict) else None
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"not a CompVis model config: {where} is missing or not a mapping")
        data = value
    return data


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Read a CompVis-format config (``model.params.{unet,first_stage,cond_stage}_config``) from a mapping."""
    params = _section(data, "model", "params")
    unet_params = _section(params, "unet_config", "params")
    first_stage = _section(params, "first_stage_config", "params")
    ddconfig = dict(_section(first_stage, "ddconfig", required=False))
    ddconfig["embed_dim"] = first_stage.get("embed_dim", 4)
    cond_params = _section(params, "cond_stage_config", "params", required=False)
    schedule = {
        key: params[key]
        for key in ("timesteps", "linear_start", "linear_end", "beta_schedule", "parameterization")
        if key in params
    }
    return ModelConfig(
        unet=_pick(UNetConfig, unet_params),
        vae=_pick(VAEConfig, ddconfig),
        text=_pick(TextEncoderConfig, cond_params),
        schedule=_pick(ScheduleConfig, schedule),
        scale_factor=params.get("scale_factor", 0.18215),
    )


def _read_config_text(path: Path) -> str:
    """The file's text: a regular file under :data:`MAX_CONFIG_BYTES`, valid UTF-8."""
    return read_utf8_text(path, escaped(path, 300), "config", ConfigError, MAX_CONFIG_BYTES,
                          missing="config file not found", limit_note="a model config is a few KB")


def _flow_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting, quotes ignored: PyYAML's scanner is quadratic in it."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def _refuse_yaml_bombs(text: str) -> None:
    """Aliases (``*a``) let a 1 KB yaml expand to gigabytes when omegaconf copies it: configs need none.
    Deep flow nesting (``[[[[...``) makes PyYAML's scanner quadratic: configs nest 2 deep."""
    if _flow_depth(text) > MAX_YAML_DEPTH:
        raise ConfigError(f"nests brackets deeper than {MAX_YAML_DEPTH} levels")
    for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError("uses yaml aliases (*name), which model configs do not need")
        if count > MAX_YAML_EVENTS:
            raise ConfigError(f"has more than {MAX_YAML_EVENTS} yaml nodes")


def load_model_config(path: str | Path = DEFAULT_CONFIG) -> ModelConfig:
    """Read a CompVis-format yaml file into a :class:`ModelConfig`; every problem is one-line ConfigError."""
    path = Path(path)
    text = _read_config_text(path)
    shown = escaped(path, 300)
    try:
        _refuse_yaml_bombs(text)
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
        return model_config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"config {shown}: {error}") from None
    except Exception as error:  # yaml, omegaconf interpolation, recursion: all one line
        raise ConfigError(f"cannot read config {shown}: {type(error).__name__}: {one_line(error, 200)}") from None
