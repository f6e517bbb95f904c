"""Typed model configs read from CompVis-format yaml files.

CompVis builds its models with ``instantiate_from_config`` (``target:`` import strings); here the yaml
is plain data: the architecture keys are read into small frozen dataclasses and everything else
(targets, training settings, loss configs) is ignored. No code named in a yaml is ever imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from ldm.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "stable-diffusion" / "v1-inference.yaml"


class ConfigError(UserError, ValueError):
    """A model config that cannot be read or does not describe an SD v1-style model."""


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
        if not self.use_spatial_transformer:
            raise ConfigError("only text-conditioned UNets (use_spatial_transformer: True) are supported")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ConfigError("unet_config needs num_heads or num_head_channels")

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


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule of ``LatentDiffusion``: ``linear`` betas are linspace(sqrt(b0), sqrt(b1))**2."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    beta_schedule: str = "linear"
    parameterization: str = "eps"

    def __post_init__(self) -> None:
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
    kwargs = {}
    for key, value in params.items():
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"bad {cls.__name__} values: {error}") from None


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Read a CompVis-format config (``model.params.{unet,first_stage,cond_stage}_config``) from a mapping."""
    try:
        params = data["model"]["params"]
        unet_params = params["unet_config"]["params"]
        first_stage = params["first_stage_config"]["params"]
    except (KeyError, TypeError):
        raise ConfigError("not a CompVis model config: model.params.unet_config / first_stage_config missing") from None
    ddconfig = dict(first_stage.get("ddconfig") or {})
    ddconfig["embed_dim"] = first_stage.get("embed_dim", 4)
    cond_params = (params.get("cond_stage_config") or {}).get("params") or {}
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
        scale_factor=float(params.get("scale_factor", 0.18215)),
    )


def load_model_config(path: str | Path = DEFAULT_CONFIG) -> ModelConfig:
    """Read a CompVis-format yaml file into a :class:`ModelConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:  # omegaconf raises several yaml and interpolation errors
        raise ConfigError(f"cannot read config {path}: {error}") from None
    return model_config_from_dict(data)
