"""How much memory a runtime needs for its limits, checked at setup: a request too large for the machine is refused
with the limits named, instead of an allocator traceback or the OOM killer mid-job."""
from __future__ import annotations

import torch

from vidrd.ref.config import LATENT_FACTOR


def buffer_bytes(cfg, lim, text_dtype, unet_dtype, vae_dtype, device) -> int:
    """Bytes of the buffers Runtime.__init__ allocates for `lim` (the guidance-reuse buffer included), from the
    same sizes, so a request too large for the machine is refused before any allocation."""
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    c, h, w, d = cfg.unet.in_channels, lim.height // LATENT_FACTOR, lim.width // LATENT_FACTOR, cfg.text.hidden_size
    b, f = lim.batch, lim.frames
    n, pixels = b * c * f * h * w, b * f * 3 * lim.height * lim.width  # one clip of latents, of frames
    fp32 = 4 * (7 * n + (n if torch.device(device).type != "cpu" else 0)  # latents ... d_last, history, noise
                + lim.steps * b * c * lim.overlap * h * w)  # history of the overlap frames (T,B,C,O,h,w)
    text = 2 * b * 77 * d * (size(text_dtype) + (0 if unet_dtype == text_dtype else size(unet_dtype)))
    text += lim.video_prompts * 2 * 77 * d * size(unet_dtype)  # ctx_more: the other prompts of a video; ctx_blend
    unet = 2 * 2 * n * size(unet_dtype)  # x_in, eps (2B,C,F,h,w)
    vae = n * size(vae_dtype) + pixels * (size(vae_dtype) + (0 if vae_dtype == torch.float32 else 4) + 1)
    return fp32 + text + unet + vae


def available_bytes(device) -> int | None:
    """Memory free for new buffers on `device` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Working memory of one call, in units of its first activation map: the UNet's (2B,C0,F,h,w), the VAE decoder's
# (1,C0,H,W) for one frame. Lower bounds of the peaks measured on the tiny and shapes presets (UNet 27-44, VAE
# 6-10), so only what cannot fit is refused.
UNET_WORKING_MAPS, VAE_WORKING_MAPS = 24, 6


def working_bytes(cfg, lim, unet_dtype, vae_dtype) -> int:
    """A lower bound of the activations of one UNet call and one frame's VAE decode at `lim`."""
    size = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    h, w = lim.height // LATENT_FACTOR, lim.width // LATENT_FACTOR
    unet = 2 * lim.batch * cfg.unet.block_out_channels[0] * lim.frames * h * w
    vae = cfg.vae.block_out_channels[0] * lim.height * lim.width
    return UNET_WORKING_MAPS * unet * size(unet_dtype) + VAE_WORKING_MAPS * vae * size(vae_dtype)


def check_memory(cfg, lim, text_dtype, unet_dtype, vae_dtype, device) -> None:
    """ValueError naming the limits when the runtime's buffers and one call's activations cannot fit the memory
    free on `device` (a million frames ended in an allocator traceback or the OOM killer, mid-job)."""
    need = buffer_bytes(cfg, lim, text_dtype, unet_dtype, vae_dtype, device) + working_bytes(cfg, lim, unet_dtype,
                                                                                              vae_dtype)
    free = available_bytes(device)
    if free is not None and need > free:
        gib = 2 ** 30
        raise ValueError(f"the runtime's buffers and working memory for batch={lim.batch}, frames={lim.frames}, "
                         f"{lim.width}x{lim.height}, steps={lim.steps}, overlap={lim.overlap} need at least "
                         f"{need / gib:.1f} GiB, more than the {free / gib:.1f} GiB free on "
                         f"{torch.device(device).type}: lower the frames, size, batch or steps (vidrd serve: "
                         "--max-frames, --max-height, --max-width, --max-batch, --max-steps)")
