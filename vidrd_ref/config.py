"""Frozen configs for the VidRD networks, read from diffusers-style config.json files, and named presets."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

# Keys of the released config.json files that do not change the network (SPEC §0, §4.9).
# Pixels per latent cell: the SD VAE halves the frame size 3 times (h = H / 8), every model of this family
LATENT_FACTOR = 8
_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "architectures", "sample_size", "mid_block_type",
    "center_input_sample", "dual_cross_attention", "downsample_padding", "only_cross_attention",
    "mid_block_scale_factor", "num_class_embeds", "upcast_attention", "torch_dtype", "transformers_version",
    "add_temp_embed", "add_temp_conv", "scaling_factor", "force_upcast", "shift_factor", "latents_mean",
    "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}

_UNET_2D_TO_3D = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock3D", "DownBlock2D": "DownBlock3D",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock3D", "UpBlock2D": "UpBlock3D",
    "CrossAttnDownBlock3D": "CrossAttnDownBlock3D", "DownBlock3D": "DownBlock3D",
    "CrossAttnUpBlock3D": "CrossAttnUpBlock3D", "UpBlock3D": "UpBlock3D",
}

# Values the released model uses; anything else raises rather than silently building another network.
_UNET_REQUIRED = {
    "act_fn": "silu", "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "use_linear_projection": True, "add_temp_transformer": False, "add_temp_attn_only_on_upblocks": False,
    "prepend_first_frame": False, "center_input_sample": False, "dual_cross_attention": False,
    "only_cross_attention": False, "num_class_embeds": None, "downsample_padding": 1, "mid_block_scale_factor": 1,
}


def _check_required(name: str, raw: dict, required: dict) -> None:
    for key, want in required.items():
        if key in raw and raw[key] != want:
            raise ValueError(f"{name}: {key}={raw[key]!r} is not supported (the released VidRD model uses {want!r})")


def _known(cls, name: str, raw: dict, required: dict) -> dict:
    _check_required(name, raw, required)
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names - _IGNORED - set(required)
    if unknown:
        raise ValueError(f"{name}: unknown config keys {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}


@dataclass(frozen=True)
class UNetConfig:
    """UNet3DConditionModel as built by the official `from_pretrained_2d` (SPEC §1)."""
    block_out_channels: tuple = (320, 640, 1280, 1280)
    attention_head_dim: tuple = (5, 10, 20, 20)  # really the number of heads (diffusers quirk, SPEC §1.1)
    down_block_types: tuple = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    layers_per_block: int = 2
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 32  # latent size used for default height/width only

    def __post_init__(self):
        n = len(self.block_out_channels)
        heads = self.attention_head_dim
        if isinstance(heads, int):
            object.__setattr__(self, "attention_head_dim", (heads,) * n)
        if len(self.attention_head_dim) != n or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: block_out_channels, attention_head_dim and block types must have the "
                             f"same length, got {self.block_out_channels}, {self.attention_head_dim}, "
                             f"{self.down_block_types}, {self.up_block_types}")
        for t in self.down_block_types + self.up_block_types:
            if t not in _UNET_2D_TO_3D:
                raise ValueError(f"UNet config: unknown block type {t!r}")
        object.__setattr__(self, "down_block_types", tuple(_UNET_2D_TO_3D[t] for t in self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(_UNET_2D_TO_3D[t] for t in self.up_block_types))
        for c, h in zip(self.block_out_channels, self.attention_head_dim):
            if c % h or c % self.norm_num_groups or c % 32:
                raise ValueError(f"UNet config: channels {c} must divide by heads {h}, by norm_num_groups "
                                 f"{self.norm_num_groups} and by 32 (temporal conv GroupNorm)")

    @classmethod
    def from_dict(cls, raw: dict) -> "UNetConfig":
        return cls(**_known(cls, "UNet config", raw, _UNET_REQUIRED))


@dataclass(frozen=True)
class VAEConfig:
    """TemporalAutoencoderKL (SPEC §2); add_temp_conv False gives the plain SD VAE."""
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    add_temp_conv: bool = True

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups or (self.add_temp_conv and c % 32):
                raise ValueError(f"VAE config: channels {c} must divide by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def from_dict(cls, raw: dict) -> "VAEConfig":
        required = {"act_fn": "silu"}
        for key in ("down_block_types", "up_block_types"):
            want = "DownEncoderBlock2D" if key.startswith("down") else "UpDecoderBlock2D"
            if key in raw and any(t != want for t in raw[key]):
                raise ValueError(f"VAE config: {key}={raw[key]} is not supported (only {want})")
        raw = {k: v for k, v in raw.items() if k not in ("down_block_types", "up_block_types")}
        kw = _known(cls, "VAE config", raw, required)
        kw.setdefault("add_temp_conv", bool(raw.get("add_temp_conv", False)))
        if "scaling_factor" in raw:
            kw["scaling_factor"] = float(raw["scaling_factor"])
        return cls(**kw)


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextModel shapes (SD2.1-base: the OpenCLIP ViT-H/14 text tower minus its last layer)."""
    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    projection_dim: int = 512
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    @classmethod
    def from_dict(cls, raw: dict) -> "TextConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_hf(self):
        """The transformers CLIPTextConfig for these shapes."""
        from transformers import CLIPTextConfig
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return CLIPTextConfig(**kw, attention_dropout=0.0, dropout=0.0)


@dataclass(frozen=True)
class SchedulerConfig:
    """DDIM built from SD2.1-base's scheduler_config.json (SPEC §3.3)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    steps_offset: int = 1

    def __post_init__(self):
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        n = self.num_train_timesteps
        if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= 100_000:
            raise ValueError(f"scheduler: num_train_timesteps={n!r} must be an integer between 2 and 100000")
        if not (number(self.beta_start) and number(self.beta_end) and 0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(f"scheduler: beta_start={self.beta_start!r}, beta_end={self.beta_end!r} must be numbers "
                             "with 0 < beta_start <= beta_end < 1")
        if not isinstance(self.set_alpha_to_one, bool):
            raise ValueError(f"scheduler: set_alpha_to_one={self.set_alpha_to_one!r} must be true or false")
        so = self.steps_offset
        if not isinstance(so, int) or isinstance(so, bool) or not 0 <= so < n:
            raise ValueError(f"scheduler: steps_offset={so!r} must be an integer in [0, num_train_timesteps={n})")
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"scheduler: beta_schedule={self.beta_schedule!r} is not supported")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler: prediction_type={self.prediction_type!r} is not supported")

    @classmethod
    def from_dict(cls, raw: dict) -> "SchedulerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class ModelConfig:
    """All four configs of one VidRD model."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def read_json(path: Path) -> dict:
    """A config.json as a dict, with a clear error when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------- presets

def _sd21_base() -> ModelConfig:
    return ModelConfig()


def _small() -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(block_out_channels=(64, 128, 256, 256), attention_head_dim=(1, 2, 4, 4),
                        cross_attention_dim=256, layers_per_block=2, sample_size=32),
        vae=VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2),
        text=TextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        projection_dim=256),
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        unet=UNetConfig(block_out_channels=(32, 64, 64, 64), attention_head_dim=(1, 2, 2, 2),
                        cross_attention_dim=32, layers_per_block=2, sample_size=32),
        vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        projection_dim=32),
    )


def _shapes() -> ModelConfig:
    """vidrd-shapes, the trained default model: 64x64 video of one moving shape (runtime/shapes/)."""
    return ModelConfig(
        unet=UNetConfig(block_out_channels=(64, 96, 96, 96), attention_head_dim=(2, 2, 2, 2),
                        cross_attention_dim=128, layers_per_block=1, sample_size=8),
        vae=VAEConfig(block_out_channels=(32, 64, 96, 96), layers_per_block=1),
        text=TextConfig(vocab_size=640, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, projection_dim=128),
    )


PRESETS = {"sd21-base": _sd21_base, "small": _small, "tiny": _tiny, "shapes": _shapes}


def preset(name: str) -> ModelConfig:
    """The named preset's configs: `sd21-base` (released shapes), `small` (CPU benchmark), `tiny` (tests),
    `shapes` (the trained default model's shapes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
