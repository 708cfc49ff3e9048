"""Random-weight models in the official layout (init-random, the embedded default), and safetensors conversion."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from .bpe import write_tokenizer
from .config import ModelConfig, preset
from .ddim import DDIM
from .loading import VidRDModel, build, find_weights, load_official, read_state_dict, to
from .outputs import check_target
from .text import load_tokenizer

CKPT_NAMES = ("ModelT2V.safetensors", "ModelT2V.pth")
DEFAULT_PRESET, DEFAULT_SEED = "tiny", 0


def random_model(name: str = DEFAULT_PRESET, seed: int = DEFAULT_SEED, *, dtype=torch.float32,
                 device="cpu") -> VidRDModel:
    """A preset with seeded random weights and the built-in tokenizer; every temporal layer is non-zero."""
    cfg = preset(name)
    torch.manual_seed(seed)
    unet, vae, text = build(cfg, meta=False)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_tokenizer(Path(tmp) / "tokenizer"))
    return to(VidRDModel(cfg, unet, vae, text, tokenizer, DDIM(cfg.scheduler)), dtype=dtype, device=device)


def _unet_json(cfg: ModelConfig) -> dict:
    u = cfg.unet
    names = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
             "CrossAttnUpBlock3D": "CrossAttnUpBlock2D", "UpBlock3D": "UpBlock2D"}
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": list(u.attention_head_dim),
            "block_out_channels": list(u.block_out_channels), "cross_attention_dim": u.cross_attention_dim,
            "down_block_types": [names[t] for t in u.down_block_types], "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": u.in_channels, "layers_per_block": u.layers_per_block, "norm_eps": u.norm_eps,
            "norm_num_groups": u.norm_num_groups, "out_channels": u.out_channels, "sample_size": u.sample_size,
            "up_block_types": [names[t] for t in u.up_block_types], "use_linear_projection": True,
            "upcast_attention": False, "center_input_sample": False, "downsample_padding": 1}


def _vae_json(cfg: ModelConfig, temporal: bool) -> dict:
    v = cfg.vae
    n = len(v.block_out_channels)
    out = {"_class_name": "TemporalAutoencoderKL" if temporal else "AutoencoderKL", "act_fn": "silu",
           "block_out_channels": list(v.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
           "up_block_types": ["UpDecoderBlock2D"] * n, "in_channels": v.in_channels, "out_channels": v.out_channels,
           "latent_channels": v.latent_channels, "layers_per_block": v.layers_per_block,
           "norm_num_groups": v.norm_num_groups, "scaling_factor": v.scaling_factor}
    return {**out, "add_temp_conv": True} if temporal else out


def _scheduler_json(cfg: ModelConfig) -> dict:
    return {"_class_name": "PNDMScheduler", **asdict(cfg.scheduler), "clip_sample": False, "skip_prk_steps": True,
            "trained_betas": None}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(obj, path: Path, safetensors: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if safetensors:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)  # safetensors creates its files 0600; the folder's other files follow the umask
    else:
        torch.save(obj, str(path))


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a finished folder into place; an existing output is replaced only with force."""
    if out.exists():
        check_target(out, force, "model")  # only a model folder, and only with force
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def write_official(model: VidRDModel, out: Path, *, safetensors: bool = False, force: bool = False,
                   sd_vae: dict | None = None, tokenizer_dir: Path | None = None, sd_vae_weights: bool = True) -> Path:
    """Write `model` in the official layout: sd/ (configs, tokenizer, SD VAE), ModelT2V, vae_finetuned/.

    sd/vae gets `sd_vae` when given (a released SD VAE), else the 2-D part of the model's VAE; sd/tokenizer is a
    copy of `tokenizer_dir` when given, else the built-in tokenizer of random models. sd_vae_weights=False writes
    sd/vae's config only (the loader reads vae_finetuned/ when present; the weights would repeat its 2-D half).
    Tensors are saved in the model's dtype.
    """
    out = Path(out)
    check_target(out, force, "model", parent_may_be_missing=True)  # --force replaces a model folder, nothing else
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the published folder gets the usual permissions
    try:
        cfg = model.config
        sd = tmp / "sd"
        _write_json(sd / "unet" / "config.json", _unet_json(cfg))
        _write_json(sd / "text_encoder" / "config.json",
                    {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(cfg.text)})
        _write_json(sd / "scheduler" / "scheduler_config.json", _scheduler_json(cfg))
        _write_json(sd / "vae" / "config.json", _vae_json(cfg, temporal=False))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, sd / "tokenizer")
        else:
            write_tokenizer(sd / "tokenizer")
        vae_state = {k: v.cpu() for k, v in model.vae.state_dict().items()}
        plain = sd_vae if sd_vae is not None else {k: v for k, v in vae_state.items() if "temp_" not in k}
        ext = "safetensors" if safetensors else "bin"
        if sd_vae_weights:
            _save(plain, sd / "vae" / f"diffusion_pytorch_model.{ext}", safetensors)
        _write_json(tmp / "vae_finetuned" / "config.json", _vae_json(cfg, temporal=cfg.vae.add_temp_conv))
        _save(vae_state, tmp / "vae_finetuned" / f"diffusion_pytorch_model.{ext}", safetensors)
        state = {f"unet.{k}": v.cpu() for k, v in model.unet.state_dict().items()}
        state.update({f"text_encoder.{k}": v.cpu() for k, v in model.text_encoder.state_dict().items()})
        if safetensors:
            _save(state, tmp / CKPT_NAMES[0], True)
        else:
            _save({"state_dict": state, "epoch": 0, "global_step": 0}, tmp / CKPT_NAMES[1], False)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_random(name: str, out: Path, seed: int = DEFAULT_SEED, *, force: bool = False) -> Path:
    """`vidrd init-random`: a seeded random-weight model of preset `name`, written in the official layout."""
    check_target(out, force, "model", parent_may_be_missing=True)  # before the model is built
    return write_official(random_model(name, seed), out, force=force)


def resolve(weights_dir: Path) -> tuple[Path, Path, Path | None]:
    """(sd_dir, ckpt_path, vae_dir or None) of a folder in the official layout."""
    d = Path(weights_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"weights folder not found: {d} (make one with `vidrd init-random`)")
    ckpt = next((d / n for n in CKPT_NAMES if (d / n).is_file()), None)
    if ckpt is None or not (d / "sd").is_dir():
        raise FileNotFoundError(f"{d} is not in the official layout: expected sd/ and one of {CKPT_NAMES}")
    vae = d / "vae_finetuned"
    return d / "sd", ckpt, vae if vae.is_dir() else None


def load_dir(weights_dir: Path, **kw) -> VidRDModel:
    """load_official on a folder in the official layout."""
    return load_official(*resolve(weights_dir), **kw)


def convert(sd_dir, ckpt_path, vae_dir, out: Path, *, force: bool = False) -> Path:
    """Rewrite a released model as safetensors (same layout, no pickles): checked by loading it first."""
    check_target(out, force, "model", parent_may_be_missing=True)  # before the released model loads
    model = load_official(sd_dir, ckpt_path, vae_dir)
    sd_vae = read_state_dict(find_weights(Path(sd_dir) / "vae", "vae")) if vae_dir is not None else None
    return write_official(model, out, safetensors=True, force=force, sd_vae=sd_vae,
                          tokenizer_dir=Path(sd_dir) / "tokenizer")
