"""Loading the released VidRD files (SPEC §0): SD2.1-base folder + ModelT2V.pth + vae_finetuned/, strictly and safely."""
from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig, SchedulerConfig, TextConfig, UNetConfig, VAEConfig, read_json
from .ddim import DDIM
from .text import TextEncoder, load_tokenizer
from .unet import UNet3D
from .vae import TemporalVAE

WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
# diffusers >= 0.15 renamed the VAE attention; the release uses the 0.14 names, which our modules keep.
_NEW_VAE_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class WeightsError(ValueError):
    """A weights file that cannot be loaded: unreadable, unsafe, or not matching the network."""


@dataclass
class VidRDModel:
    """The loaded model; these attribute names are a contract with the sampler, exporter and runtime."""
    config: ModelConfig
    unet: UNet3D
    vae: TemporalVAE
    text_encoder: TextEncoder
    tokenizer: object
    scheduler: DDIM

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a PyTorch pickle through torch.load(weights_only=True) only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        # mmap avoids a second copy of large checkpoints; only the zip format (torch >= 1.6 saves) supports it
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # the weights-only unpickler names the global it refused; anything else is not a pickle it can read
        unsafe = re.search(r"(?i)unsupported global[^\n]*|GLOBAL [^\n]*", str(e))
        unsafe = unsafe.group(0) if unsafe else ", ".join(_pickle_globals(path))
        if unsafe:
            raise WeightsError(f"{path}: refused to load: the pickle holds objects other than tensors, which could "
                               f"run code ({unsafe})") from None
        raise WeightsError(f"{path}: not a PyTorch checkpoint (torch.save) or safetensors file: unreadable, truncated "
                           "or corrupt") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError,
            UnicodeDecodeError) as e:  # what torch's readers raise on bytes that are not a checkpoint
        first = str(e).splitlines()[0] if isinstance(e, (RuntimeError, ValueError)) and str(e) else type(e).__name__
        raise WeightsError(f"{path}: truncated or corrupt weights file, or not a PyTorch checkpoint "
                           f"({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a PyTorch-Lightning checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def _pickle_globals(path: Path) -> list[str]:
    """The globals that a plain pickle file would import, read by pickletools without running anything; [] when the
    file is not a pickle (random bytes) or imports nothing."""
    import pickletools
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - pickletools raises ValueError and others on bytes that are not a pickle
        return []
    return names


def find_weights(folder: Path, component: str) -> Path:
    """The weights file of a diffusers/transformers component folder (safetensors preferred)."""
    for name in WEIGHT_NAMES[component]:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"no weights in {folder}: expected one of {WEIGHT_NAMES[component]}")


def _fmt(keys: list[str]) -> str:
    return f"{len(keys)} ({', '.join(sorted(keys)[:5])}{', ...' if len(keys) > 5 else ''})"


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], component: str, source: Path | str) -> None:
    """Assign `state` into a meta-built `module`; any missing, unexpected or mis-shaped key is an error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_fmt(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes {len(shapes)} ({'; '.join(shapes[:3])})")
    kinds = [f"{k}: file {state[k].dtype} vs model {v.dtype}" for k, v in expected.items()
             if k in state and state[k].is_floating_point() != v.is_floating_point()]
    if kinds:  # integers where weights belong (or floats for integer buffers): a converted file gone wrong
        problems.append(f"wrong dtypes {len(kinds)} ({'; '.join(kinds[:3])})")
    if not problems:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # NaN or inf weights make an all-black video with exit code 0
            problems.append(f"NaN or inf values in {_fmt(bad)}")
    if problems:
        raise WeightsError(f"{component} weights from {source} do not match the network: " + "; ".join(problems))
    # Float tensors take the model's dtype; integer buffers (position_ids) keep theirs.
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


def build(cfg: ModelConfig, meta: bool = True) -> tuple[UNet3D, TemporalVAE, TextEncoder]:
    """The three networks, on the meta device (no memory) or initialised on the CPU."""
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        return UNet3D(cfg.unet), TemporalVAE(cfg.vae), TextEncoder(cfg.text)


def _vae_keys(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for new, old in _NEW_VAE_ATTN.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


def _text_keys(state: dict) -> dict:
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    if "text_model.embeddings.position_ids" not in state:  # saves from newer transformers lack the buffer
        n = state["text_model.embeddings.position_embedding.weight"].shape[0]
        state["text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return state


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_official(sd_dir, ckpt_path, vae_dir=None, *, dtype=torch.float32, device="cpu") -> VidRDModel:
    """The released layout: SD2.1-base folder, ModelT2V.pth (`unet.*`, `text_encoder.*`), vae_finetuned/."""
    sd_dir, ckpt_path = Path(sd_dir), Path(ckpt_path)
    if not sd_dir.is_dir():
        raise FileNotFoundError(f"SD2.1-base folder not found: {sd_dir}")
    vae_folder = Path(vae_dir) if vae_dir is not None else sd_dir / "vae"
    vae_raw = read_json(vae_folder / "config.json")
    if vae_dir is None:
        vae_raw = {**vae_raw, "add_temp_conv": False}  # SD's own VAE is the plain 2-D one
    cfg = ModelConfig(
        unet=UNetConfig.from_dict(read_json(sd_dir / "unet" / "config.json")),
        vae=VAEConfig.from_dict(vae_raw),
        text=TextConfig.from_dict(read_json(sd_dir / "text_encoder" / "config.json")),
        scheduler=SchedulerConfig.from_dict(read_json(sd_dir / "scheduler" / "scheduler_config.json")),
    )
    ckpt = read_state_dict(ckpt_path)
    unet, vae, text = build(cfg)

    unet_state = _prefixed(ckpt, "unet")
    if not unet_state:
        raise WeightsError(f"{ckpt_path} holds no `unet.*` keys: it is not a VidRD checkpoint")
    load_strict(unet, unet_state, "unet", ckpt_path)

    text_state, text_src = _prefixed(ckpt, "text_encoder"), ckpt_path  # the fine-tuned encoder overrides SD's
    if not text_state:
        text_src = find_weights(sd_dir / "text_encoder", "text_encoder")
        text_state = read_state_dict(text_src)
    load_strict(text, _text_keys(text_state), "text_encoder", text_src)

    vae_src = find_weights(vae_folder, "vae")
    vae_state = read_state_dict(vae_src)
    if vae_dir is None and _prefixed(ckpt, "vae"):  # official: checkpoint's vae.* only without a temporal VAE
        vae_state, vae_src = _prefixed(ckpt, "vae"), ckpt_path
    load_strict(vae, _vae_keys(vae_state), "vae", vae_src)

    del ckpt
    model = VidRDModel(cfg, unet, vae, text, load_tokenizer(sd_dir / "tokenizer"), DDIM(cfg.scheduler))
    return to(model, dtype=dtype, device=device)


def to(model: VidRDModel, *, dtype=None, device=None) -> VidRDModel:
    """Move all networks to `device` and `dtype` (integer buffers keep theirs), in eval mode, without grads."""
    for m in (model.unet, model.vae, model.text_encoder):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model
