"""A tiny decoder for previews and drafts: TAESD's design (madebyollin/taesd: 3x3 convolutions, ReLUs, residual
blocks, nearest 2x upsampling), narrower, distilled from a model's VAE decoder (`vidrd train-decoder`). The last 2x
is a pixel shuffle of the 4x features (no convolution at full size), which is most of its speed on a CPU.

It decodes what the VAE decodes (latents / scaling_factor, one frame at a time, no temporal layers) into the VAE's
output range ([-1, 1] before the runtime's clamp), so it can stand in for the VAE backend (`TinyVAE`) and decode the
loop's predicted clean latents (x0) into preview frames (`Previews`).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vidrd.ref.config import LATENT_FACTOR

CHANNELS = (64, 48, 32)  # widths at latent size, 2x, 4x: the shipped shapes decoder
BLOCKS = (1, 1, 1)  # residual blocks at each size
FORMAT = "vidrd-tiny-decoder"
SD_SCALING_FACTOR = 0.18215  # the SD1/2 VAE's latent scale, which the public TAESD weights expect


def _conv(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Block(nn.Module):
    """TAESD's residual block, two convolutions instead of three: relu(x + conv(relu(conv(x))))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c))

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class TinyDecoder(nn.Module):
    """(N,C,h,w) latents / scaling_factor -> (N,3,8h,8w) in about [-1, 1], each frame on its own."""

    def __init__(self, latent_channels: int = 4, channels: tuple = CHANNELS, blocks: tuple = BLOCKS):
        super().__init__()
        if len(channels) != 3 or len(blocks) != 3 or min(channels) < 1 or min(blocks) < 0:
            raise ValueError(f"channels={channels}, blocks={blocks}: three widths >= 1 and three block counts >= 0")
        self.latent_channels, self.channels, self.blocks = latent_channels, tuple(channels), tuple(blocks)
        layers = [_conv(latent_channels, channels[0]), nn.ReLU()]
        for k, (c, n) in enumerate(zip(channels, blocks)):
            if k > 0:  # (N,c_prev,s,s) -> (N,c,2s,2s)
                layers += [nn.Upsample(scale_factor=2), _conv(channels[k - 1], c, bias=False), nn.ReLU()]
            layers += [Block(c) for _ in range(n)]
        layers += [_conv(channels[-1], 3 * 4), nn.PixelShuffle(2)]  # (N,12,4h,4w) -> (N,3,8h,8w)
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)

    def meta(self) -> dict[str, str]:
        return {"format": FORMAT, "latent_channels": str(self.latent_channels),
                "channels": json.dumps(self.channels), "blocks": json.dumps(self.blocks)}


def save(decoder: TinyDecoder, path: Path, dtype=torch.float16) -> None:
    """Write the weights (fp16 by default) and the architecture as safetensors metadata, atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in decoder.state_dict().items()}
    save_file(state, str(tmp), metadata=decoder.meta())
    tmp.replace(path)


def load(path: Path, device="cpu", dtype=torch.float32) -> "TinyDecoder | TAESDDecoder":
    """A TinyDecoder from `path`, or the public TAESD decoder for a file in its layout (SD1/2's scaling factor until
    the caller sets the model's); ValueError naming the key when a tensor is missing, extra or of another shape."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tiny decoder at {path}: make one with `vidrd train-decoder --out {path}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") is None and "1.weight" in f.keys():
            return load_taesd(path, SD_SCALING_FACTOR, device, dtype)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (metadata format={meta.get('format')!r})")
        decoder = TinyDecoder(int(meta["latent_channels"]), tuple(json.loads(meta["channels"])),
                              tuple(json.loads(meta["blocks"])))
        want = decoder.state_dict()
        for key in f.keys():
            if key not in want:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
        state = {}
        for key, ref in want.items():
            if key not in f.keys():
                raise ValueError(f"{path}: missing tensor {key!r} {tuple(ref.shape)}")
            t = f.get_tensor(key)
            if t.shape != ref.shape:
                raise ValueError(f"{path}: tensor {key!r} is {tuple(t.shape)}, the architecture needs "
                                 f"{tuple(ref.shape)}")
            state[key] = t
    decoder.load_state_dict(state)
    return decoder.to(device, dtype).eval().requires_grad_(False)


class TAESDBlock(nn.Module):
    """TAESD's residual block: relu(conv(relu(conv(relu(conv(x))))) + x), 64 channels."""

    def __init__(self, c: int = 64):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class TAESDDecoder(nn.Module):
    """The public TAESD decoder for SD latents (madebyollin/taesd's layout: its weights load by their keys) behind
    the runtime's interface: (N,4,h,w) latents / scaling_factor -> (N,3,8h,8w) in about [-1, 1]. TAESD takes the
    UNet's own latents and draws in [0, 1], hence the two rescalings."""

    def __init__(self, scaling_factor: float):
        super().__init__()
        self.scaling_factor, self.latent_channels = scaling_factor, 4
        layers = [nn.Identity(), _conv(4, 64), nn.ReLU()]  # index 0: TAESD's tanh clamp, applied in forward
        for _ in range(3):  # (N,64,s,s) -> (N,64,2s,2s)
            layers += [TAESDBlock(), TAESDBlock(), TAESDBlock(), nn.Upsample(scale_factor=2),
                       _conv(64, 64, bias=False)]
        layers += [TAESDBlock(), _conv(64, 3)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(z * self.scaling_factor / 3) * 3  # the UNet's latents, clamped as TAESD does
        return self.layers(x) * 2 - 1


def load_taesd(path: Path, scaling_factor: float, device="cpu", dtype=torch.float32) -> TAESDDecoder:
    """The public TAESD decoder weights (safetensors, e.g. taesd_decoder.safetensors) as a TAESDDecoder; ValueError
    naming the key when a tensor is missing, extra or of another shape (another TAESD, e.g. SDXL's, has other
    shapes only where its latents differ)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TAESD decoder weights at {path}")
    decoder = TAESDDecoder(scaling_factor)
    want, got = decoder.layers.state_dict(), load_file(str(path))
    for key in got:
        if key not in want:
            raise ValueError(f"{path}: unexpected tensor {key!r} (not TAESD's decoder layout)")
    for key, ref in want.items():
        if key not in got:
            raise ValueError(f"{path}: missing tensor {key!r} {tuple(ref.shape)}")
        if got[key].shape != ref.shape:
            raise ValueError(f"{path}: tensor {key!r} is {tuple(got[key].shape)}, TAESD's decoder needs "
                             f"{tuple(ref.shape)}")
    decoder.layers.load_state_dict(got)
    return decoder.to(device, dtype).eval().requires_grad_(False)


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> uint8 as the runtime's VAE path makes it ([0, 1], x255, truncated)."""
    return y.div(2).add_(0.5).clamp_(0, 1).mul_(255).to(torch.uint8)


class TinyVAE:
    """The tiny decoder as the runtime's VAE backend (`--decoder tiny`, a draft mode): always per frame."""

    def __init__(self, decoder: TinyDecoder, dtype: torch.dtype, device):
        self.decoder = decoder.to(device, dtype)
        self.dtype, self.device = dtype, torch.device(device)

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        """Any size runs; temporal decoding is the VAE's and is refused here."""
        if temporal:
            raise ValueError("temporal_decode needs the VAE's temporal layers; the tiny decoder decodes per frame")

    def new_context(self) -> None:
        pass

    @torch.no_grad()
    def __call__(self, latents, out, temporal: bool):
        b, c, f, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * f, c, h, w)  # ((B F),C,h,w) b-major
        out.view(b * f, *out.shape[-3:]).copy_(self.decoder(z))  # ((B F),3,H,W)


class Previews:
    """Preview frames of a Runtime's generations: every `every` steps the loop copies its predicted clean latents
    (x0) into `x0` (Generation.keep_x0), and one background thread decodes them with the tiny decoder and calls
    on_preview(clip, step, frames (B,F,H,W,3) uint8) there. The copy is the loop's only cost. With drop=True a
    preview that falls due while the previous one is still decoding is skipped, so the loop never waits; with
    drop=False the loop waits for it (every preview arrives: tests). On the CPU the thread runs torch on one thread
    (OpenMP's count is per thread), leaving the loop's pool as it is."""

    def __init__(self, decoder: TinyDecoder, limits, scaling_factor: float, every: int = 5, drop: bool = True,
                 device="cpu"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"preview every={every!r} must be a whole number of steps >= 1")
        c, h, w = decoder.latent_channels, limits.height // LATENT_FACTOR, limits.width // LATENT_FACTOR
        self.decoder, self.every, self.drop, self.scale = decoder.to(device), every, drop, scaling_factor
        self.x0_all = torch.empty(limits.batch * c * limits.frames * h * w, device=device)  # (B,C,F,h,w) float32
        self.x0 = self.x0_all[:0]
        self.on_preview = None
        self.clip = self.step = 0
        self.error: BaseException | None = None
        self._go, self._idle, self._closed = threading.Event(), threading.Event(), False
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name="vidrd-preview", daemon=True)
        self._thread.start()

    def begin(self, shape: tuple, on_preview) -> None:
        """A generation of latents `shape` (B,C,F,h,w) starts: bind the view and the callback."""
        self.flush()
        self.x0 = self.x0_all[: int(np.prod(shape))].view(shape)
        self.on_preview = on_preview

    def due(self, i: int) -> bool:
        """Step i (0-based) ends a stretch of `every` steps and the thread can take a preview."""
        if (i + 1) % self.every:
            return False
        if not self.drop:
            self._idle.wait()
        return self._idle.is_set()

    def capture(self, c: int, i: int, x0: torch.Tensor) -> None:
        """Copy x0 (B,C,F,h,w) and hand it to the thread (no allocation)."""
        self.x0.copy_(x0)
        self.clip, self.step = c, i + 1
        self._idle.clear()
        self._go.set()

    def flush(self) -> None:
        """Wait for the preview being decoded; re-raise an error of its callback."""
        self._idle.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _work(self) -> None:
        if self.x0_all.device.type == "cpu":
            torch.set_num_threads(1)  # this thread's OpenMP count only
        while True:
            self._go.wait()
            self._go.clear()
            if self._closed:
                return
            try:
                with torch.no_grad():
                    b, c, f, h, w = self.x0.shape
                    z = self.x0.transpose(1, 2).reshape(b * f, c, h, w) / self.scale  # ((B F),C,h,w)
                    frames = to_uint8(self.decoder(z)).view(b, f, 3, 8 * h, 8 * w).permute(0, 1, 3, 4, 2)
                    self.on_preview(self.clip, self.step, frames.cpu().numpy())  # (B,F,H,W,3)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by flush()
                self.error = e
            finally:
                self._idle.set()

    def close(self) -> None:
        self._idle.wait()
        self._closed = True
        self._go.set()
        self._thread.join()
