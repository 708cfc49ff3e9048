"""Training vidrd-shapes: the `shapes` preset trained on procedural video (data.py), written in the official layout.

Three phases, each resumable from `DIR/state.pt` (every batch and every random draw is a function of the seed and the
step, so a resumed run continues exactly where a checkpoint left it):
1. the VAE (encoder + temporal decoder): L1 + MSE reconstruction with object pixels weighted up, a small KL; the
   decoder sees per-frame batches (what the pipeline decodes) and, every other step, whole clips (temporal layers);
   then the latent scale is measured on the data (1 / std of the latents), replacing SD's 0.18215.
2. the UNet3D and the CLIP-architecture text encoder together: epsilon prediction on SD2.1's scaled-linear DDPM
   schedule, min-SNR-5 loss weights, 10% of captions dropped to "" for classifier-free guidance, AdamW with warm-up
   and cosine decay, EMA weights;
3. direction: the plain loss leaves the direction word unused, so a margin loss asks each caption to predict the
   noise of its video better than the same caption with another direction word (TrainConfig.dir_*). The shipped
   weights are this phase's last step (`ship`), see the model card.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from vidrd.ref.bpe import write_tokenizer
from vidrd.ref.config import preset
from vidrd.ref.ddim import DDIM, alphas_cumprod
from vidrd.ref.loading import VidRDModel, build
from vidrd.ref.sampler import check_seed
from vidrd.ref.text import load_tokenizer, tokenize
from vidrd.ref.unet_blocks import TemporalConv

from . import data

STATE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; the defaults are what made the shipped model."""
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 8  # videos; 2 frames of each, or every 4th step whole clips of 2 of them
    vae_lr: float = 5e-4
    kl_weight: float = 1e-4
    object_weight: float = 8.0  # extra loss weight on pixels that differ from the background
    unet_steps: int = 6000
    unet_batch: int = 8  # videos
    unet_lr: float = 4e-4
    warmup: int = 300
    ema: float = 0.999
    caption_dropout: float = 0.1
    min_snr: float = 5.0
    scale_batches: int = 16  # batches used to measure the latent scale
    offset_noise: float = 0.1
    offset_noise_from: int = 2425  # the shipped run added it at this step (backgrounds came out too dark before)
    # Phase 3, direction: the plain loss leaves the direction word unused (its share of the loss is ~1% and lost in
    # the batch noise), so each caption is paired with the same noisy video under another direction word and a
    # margin loss on log(error) asks the right caption to predict the noise better (a diffusion-classifier loss).
    dir_steps: int = 2643
    dir_lr: float = 1e-4
    dir_weight: float = 1.0
    # At weight 1 the model learned the direction word within ~600 steps (generated direction 19% -> 56%) but its
    # plain loss tripled (colour 100% -> 81%); from `dir_switch` on, the weight drops to `dir_weight_late` and the
    # learning rate decays (cosine to 10%) so the plain loss can recover while the margin holds.
    dir_weight_late: float = 0.3
    dir_switch: int = 643
    dir_margin: float = 0.05
    dir_t_min: int = 300  # the margin loss applies to timesteps >= this (below, the video itself shows its motion)
    # Phase 4, continuation: clips cut from long tracks (data.window_batch), so a later clip of a long video is in
    # distribution: it starts where the previous clip's last `cont_overlap` frames are (the frames the loop pins),
    # anywhere in the frame, and its direction word may differ from theirs (stories). The margin loss of phase 3
    # counts the new frames only; a turned clip's wrong caption is the previous direction half the time.
    cont_steps: int = 0  # the shipped model has no continuation phase (BENCHMARKS.md: a 1200-step trial, not shipped)
    cont_lr: float = 1e-4
    cont_weight: float = 0.3
    cont_turn: float = 0.5  # probability that a clip's direction differs from the clip before
    cont_overlap: int = 4
    cont_before: float = 0.5  # probability that a turned clip's wrong caption names the previous direction
    # clips per track (data.window_batch's `segments`): 0, a track ends at the captioned clip (the 1200-step trial);
    # 3, first clips too are placed and paced so that two more clips fit in the frame
    cont_segments: int = 0
    # the weights exported: "ema" (EMA of the UNet and text encoder, decay `ema`) or "raw" (the last step's). The
    # shipped model is "raw": after the direction phase its EMA still averaged in pre-direction weights (48 samples:
    # direction 75% EMA, 92% raw; colour 100% both)
    ship: str = "raw"

    def validate(self) -> None:
        """ValueError naming the first bad setting: every number finite and in its range, before any work."""
        for f in fields(self):
            v, want = getattr(self, f.name), (int,) if isinstance(f.default, int) else (int, float)
            if isinstance(f.default, str):
                continue
            if isinstance(v, bool) or not isinstance(v, want) or not math.isfinite(v):
                raise ValueError(f"{f.name}={v!r} must be a finite {type(f.default).__name__}")
        check_seed(self.seed)
        for name in ("vae_lr", "unet_lr", "dir_lr", "cont_lr", "min_snr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("vae_steps", "unet_steps", "dir_steps", "warmup", "dir_switch", "offset_noise_from", "kl_weight",
                     "object_weight", "offset_noise", "dir_weight", "dir_weight_late", "dir_margin", "dir_t_min",
                     "cont_steps", "cont_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.dir_t_min >= 1000:
            raise ValueError(f"dir_t_min={self.dir_t_min} must be below the 1000 training timesteps")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema={self.ema} must be in [0, 1) (the EMA's decay per step)")
        for name in ("vae_batch", "unet_batch", "scale_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("cont_turn", "cont_before"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")
        if not 0 <= self.cont_segments <= len(data.WINDOWS):
            raise ValueError(f"cont_segments={self.cont_segments} must be in 0..{len(data.WINDOWS)}")
        if not 1 <= self.cont_overlap < data.FRAMES:
            raise ValueError(f"cont_overlap={self.cont_overlap} must be in 1..{data.FRAMES - 1}")
        if self.ship not in ("ema", "raw"):
            raise ValueError(f"ship={self.ship!r} must be 'ema' or 'raw'")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")


def tokenizer_folder(folder: Path) -> Path:
    """The shapes tokenizer: CLIP-format BPE whose merges make every grammar word one token."""
    return write_tokenizer(folder, merges=1000, corpus=" ".join(data.WORDS))


def new_model(seed: int) -> VidRDModel:
    """The `shapes` preset, seeded; the last conv of every temporal layer starts at zero (identity residual)."""
    cfg = preset("shapes")
    torch.manual_seed(seed)
    unet, vae, text = build(cfg, meta=False)
    for m in list(unet.modules()) + list(vae.modules()):
        if isinstance(m, TemporalConv):
            nn_last = m.convs[-1]
            torch.nn.init.zeros_(nn_last.weight)
            torch.nn.init.zeros_(nn_last.bias)
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(tokenizer_folder(Path(tmp) / "tokenizer"))
    assert len(tok) <= cfg.text.vocab_size, (len(tok), cfg.text.vocab_size)
    return VidRDModel(cfg, unet, vae, text, tok, DDIM(cfg.scheduler))


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _gen(seed: int, phase: int, step: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + phase * 100_000_019 + step)


def _save_atomic(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """Pixels that differ from the frame's background (its median colour). x (N,3,H,W) -> (N,1,H,W) float."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]  # (N,3,1,1)
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 0.05).float()


class Trainer:
    """Holds the model, optimisers and EMA; `run` trains both phases and checkpoints into `folder`."""

    def __init__(self, folder: Path, cfg: TrainConfig, device: str = "cpu", log=print, bf16: bool | None = None,
                 start: Path | None = None):
        cfg.validate()
        self.folder, self.cfg, self.device, self.log = Path(folder), cfg, torch.device(device), log
        self.bf16 = bf16_available(self.device) if bf16 is None else bf16
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = new_model(cfg.seed)
        for m in (self.model.unet, self.model.vae, self.model.text_encoder):
            m.to(self.device)
        self.ema = {k: v.detach().clone() for k, v in self._diffusion_params().items()}
        self.vae_opt = torch.optim.AdamW(self.model.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(list(self.model.unet.parameters()) + list(self.model.text_encoder.parameters()),
                                     lr=cfg.unet_lr, weight_decay=0.01)
        self.state = {"phase": "vae", "step": 0, "scale": None, "wall": 0.0, "losses": {"vae": [], "unet": []}}
        self.ab = alphas_cumprod(self.model.config.scheduler).to(self.device)  # (1000,)
        if not self._resume() and start is not None:
            self._start_from(Path(start))

    def autocast(self):
        """bf16 matrix products where the hardware has bf16 units (AVX512-BF16/AMX, or a GPU); else float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ---------------------------------------------------------------------------------------------- state
    def _diffusion_params(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": p for k, p in self.model.unet.named_parameters()}
        out.update({f"text_encoder.{k}": p for k, p in self.model.text_encoder.named_parameters()})
        return out

    def _resume(self) -> None:
        path = self.folder / STATE
        if not path.exists():
            return False
        s = torch.load(path, map_location=self.device, weights_only=True)
        added = {k: v for k, v in asdict(self.cfg).items() if k not in s["config"]}
        if added:  # a checkpoint from before these settings existed: it continues with them (later phases)
            self.log(f"{path} predates the settings {sorted(added)}; continuing with their values")
            s["config"].update(added)
        s["config"]["ship"] = self.cfg.ship  # what is exported, not how it trains: any checkpoint can ship either
        if s["config"] != asdict(self.cfg):
            diff = {k: (s["config"].get(k), v) for k, v in asdict(self.cfg).items() if s["config"].get(k) != v}
            raise ValueError(f"{path} was made with other settings {diff}; use another --out or the same settings")
        self.model.vae.load_state_dict(s["vae"])
        self.model.unet.load_state_dict(s["unet"])
        self.model.text_encoder.load_state_dict(s["text"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.opt.load_state_dict(s["opt"])
        self.ema = s["ema"]
        self.state = s["progress"]
        self.log(f"resumed from {path}: phase {self.state['phase']}, step {self.state['step']}, "
                 f"{self.state['wall'] / 60:.1f} min trained so far")
        return True

    def _start_from(self, folder: Path) -> None:
        """A new run that begins at the continuation phase from a trained model in the official layout (its VAE,
        latent scale, UNet and text encoder; fresh optimiser state)."""
        from vidrd.ref.weights import load_dir
        m = load_dir(folder)
        self.model.vae.load_state_dict(m.vae.state_dict())
        self.model.unet.load_state_dict(m.unet.state_dict())
        self.model.text_encoder.load_state_dict(m.text_encoder.state_dict())
        self.ema = {k: v.detach().clone() for k, v in self._diffusion_params().items()}
        # the earlier phases are the start model's: a finished run does not go back to them
        self.state.update(phase="continuation", step=0, scale=m.config.vae.scaling_factor, start=str(folder),
                          dir_done=self.cfg.dir_steps)
        self.log(f"starting at the continuation phase from the model in {folder}")

    def checkpoint(self) -> None:
        _save_atomic({"config": asdict(self.cfg), "vae": self.model.vae.state_dict(),
                      "unet": self.model.unet.state_dict(), "text": self.model.text_encoder.state_dict(),
                      "vae_opt": self.vae_opt.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema,
                      "progress": self.state}, self.folder / STATE)

    # ---------------------------------------------------------------------------------------------- phases
    def vae_step(self, step: int) -> float:
        cfg, vae = self.cfg, self.model.vae
        vids, _ = data.batch(step, cfg.vae_batch, seed=cfg.seed)  # (B,F,3,H,W) in [0,1]
        b, f = vids.shape[:2]
        g = _gen(cfg.seed, 1, step, self.device)
        if step % 4 == 3:  # whole clips through the temporal layers
            frames, vids = f, vids[:2]
        else:  # two frames of every video: more variety per pixel computed than whole clips
            frames, pick = 1, torch.randint(0, f, (b, 2), generator=_gen(cfg.seed, 1, step, "cpu"))
            vids = vids[torch.arange(b)[:, None], pick]  # (B,2,3,H,W)
        x = vids.to(self.device).flatten(0, 1) * 2 - 1  # (N,3,H,W) in [-1,1]
        with self.autocast():
            moments = vae.encode(x).float()  # (N,2C,h,w)
            mean, logvar = moments.chunk(2, dim=1)
            logvar = logvar.clamp(-30, 20)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g, device=self.device)
            y = vae.decode(z, num_frames=frames).float()  # (N,3,H,W)
        w = 1 + cfg.object_weight * object_mask(x)  # (N,1,H,W)
        rec = ((y - x).abs() + (y - x).square()).mul(w).mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = rec + cfg.kl_weight * kl
        for grp in self.vae_opt.param_groups:
            grp["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 100)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        self.vae_opt.step()
        return float(rec.detach())

    @torch.no_grad()
    def measure_scale(self) -> float:
        """1 / std of the VAE's latent means over `scale_batches` batches (SD's scaling_factor, from the data)."""
        vae, zs = self.model.vae, []
        for i in range(self.cfg.scale_batches):
            vids, _ = data.batch(10_000_000 + i, self.cfg.vae_batch, seed=self.cfg.seed)
            zs.append(vae.encode(vids.to(self.device).flatten(0, 1) * 2 - 1).chunk(2, dim=1)[0])
        return float(1.0 / torch.cat(zs).std())

    def _noised(self, step: int, phase: int, seed: int):
        """Training batch `step` of a diffusion phase, noised: (x_t (B,C,F,h,w), t (B,), noise, captions, generator)."""
        return self._noise(*data.batch(step, self.cfg.unet_batch, seed=seed), step, phase)

    def _noise(self, vids: torch.Tensor, caps: list[str], step: int, phase: int):
        """Videos (B,F,3,H,W) in [0,1] encoded and noised at random timesteps; captions dropped to "" at random."""
        cfg, m = self.cfg, self.model
        b, f = vids.shape[:2]
        g = _gen(cfg.seed, phase, step, self.device)
        with torch.no_grad():
            moments = m.vae.encode(vids.to(self.device).flatten(0, 1) * 2 - 1)
            mean, logvar = moments.chunk(2, dim=1)
            z = mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn(mean.shape, generator=g, device=self.device)
            z = (z * self.state["scale"]).view(b, f, *z.shape[1:]).transpose(1, 2)  # (B,C,F,h,w)
        drop = torch.rand(b, generator=g, device=self.device) < cfg.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        t = torch.randint(0, len(self.ab), (b,), generator=g, device=self.device)
        noise = torch.randn(z.shape, generator=g, device=self.device)
        if cfg.offset_noise and (phase >= 3 or step >= cfg.offset_noise_from):
            # a per-video, per-channel constant in the noise lets the model move a whole frame's mean (the plain
            # backgrounds), which zero-mean noise at SD's terminal SNR (alpha_bar 0.005) almost never asks for
            noise = noise + cfg.offset_noise * torch.randn((b, z.shape[1], 1, 1, 1), generator=g, device=self.device)
        ab = self.ab[t].view(b, 1, 1, 1, 1)
        return ab.sqrt() * z + (1 - ab).sqrt() * noise, t, noise, caps, g

    def _update(self, loss: torch.Tensor, step: int, lr: float) -> None:
        """One optimiser step at `lr`, then the EMA (decay warms up over the run's diffusion steps `step`)."""
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in self.opt.param_groups for p in grp["params"]], 1.0)
        self.opt.step()
        decay = min(self.cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self._diffusion_params().items():
                self.ema[k].lerp_(p.detach(), 1 - decay)

    def _snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        snr = self.ab[t] / (1 - self.ab[t])
        return snr.clamp(max=self.cfg.min_snr) / snr  # min-SNR-gamma for epsilon prediction

    def unet_step(self, step: int) -> float:
        cfg, m = self.cfg, self.model
        x_t, t, noise, caps, _ = self._noised(step, 2, cfg.seed + 1)
        ids = tokenize(m.tokenizer, caps).to(self.device)  # (B,77)
        with self.autocast():
            pred = m.unet(x_t, t, m.text_encoder(ids)).float()
        loss = ((pred - noise).square().mean(dim=(1, 2, 3, 4)) * self._snr_weight(t)).mean()
        self._update(loss, step, _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup))
        return float(loss.detach())

    def direction_step(self, step: int) -> float:
        """The plain loss plus a margin between each caption and the same caption with another direction word."""
        cfg, m = self.cfg, self.model
        x_t, t, noise, caps, g = self._noised(step, 3, cfg.seed + 2)
        b = len(caps)
        other = torch.randint(1, len(data.DIRECTIONS), (b,), generator=g, device=self.device).tolist()
        wrong = [with_direction(c, o) for c, o in zip(caps, other)]
        ids = tokenize(m.tokenizer, caps + wrong).to(self.device)  # (2B,77)
        with self.autocast():
            pred = m.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), m.text_encoder(ids)).float()
        err = (pred - torch.cat([noise, noise])).square().mean(dim=(1, 2, 3, 4))  # (2B,)
        right, wrong_err = err[:b], err[b:]
        use = torch.tensor([bool(c) for c in caps], device=self.device) & (t >= cfg.dir_t_min)
        margin = torch.relu(right.log() - wrong_err.log() + cfg.dir_margin) * use
        late = step >= cfg.dir_switch
        weight = cfg.dir_weight_late if late else cfg.dir_weight
        loss = (right * self._snr_weight(t)).mean() + weight * margin.sum() / use.sum().clamp(min=1)
        if late:
            lr = _lr(step - cfg.dir_switch, cfg.dir_steps - cfg.dir_switch, cfg.dir_lr, 0)
        else:
            lr = cfg.dir_lr * min(1.0, (step + 1) / 50)
        self._update(loss, cfg.unet_steps + step, lr)
        return float(loss.detach())

    def continuation_step(self, step: int) -> float:
        """The plain loss on clips cut from long tracks, plus the direction margin on each clip's new frames."""
        cfg, m = self.cfg, self.model
        vids, caps, first, before = data.window_batch(step, cfg.unet_batch, seed=cfg.seed + 3,
                                                      overlap=cfg.cont_overlap, turn=cfg.cont_turn,
                                                      segments=cfg.cont_segments)
        x_t, t, noise, caps, g = self._noise(vids, caps, step, 4)
        b, f = len(caps), vids.shape[1]
        other = torch.randint(1, len(data.DIRECTIONS), (b,), generator=g, device=self.device).tolist()
        pick = (torch.rand(b, generator=g, device=self.device) < cfg.cont_before).tolist()
        wrong = []
        for c, o, p, d in zip(caps, other, pick, before):
            cap = data.parse(c)
            turned = cap is not None and d is not None and d != cap.direction
            wrong.append(str(replace(cap, direction=d)) if turned and p else with_direction(c, o))
        ids = tokenize(m.tokenizer, caps + wrong).to(self.device)  # (2B,77)
        with self.autocast():
            pred = m.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), m.text_encoder(ids)).float()
        sq = (pred - torch.cat([noise, noise])).square().mean(dim=(1, 3, 4))  # (2B,F)
        new = (torch.arange(f, device=self.device)[None] >= torch.tensor(first, device=self.device)[:, None]).float()
        new = torch.cat([new, new])  # (2B,F) the frames the clip adds
        err_new = (sq * new).sum(1) / new.sum(1)  # (2B,)
        use = torch.tensor([bool(c) for c in caps], device=self.device) & (t >= cfg.dir_t_min)
        margin = torch.relu(err_new[:b].log() - err_new[b:].log() + cfg.dir_margin) * use
        loss = (sq[:b].mean(1) * self._snr_weight(t)).mean() + cfg.cont_weight * margin.sum() / use.sum().clamp(min=1)
        self._update(loss, cfg.unet_steps + cfg.dir_steps + step, _lr(step, cfg.cont_steps, cfg.cont_lr, 50))
        return float(loss.detach())

    def run(self, checkpoint_every: float = 300.0, stop_after: float | None = None) -> bool:
        """Train until both phases are done (True) or `stop_after` seconds have passed (False); checkpoints often."""
        start = last_ckpt = time.monotonic()
        wall0 = self.state["wall"]
        phases = (("vae", self.cfg.vae_steps, self.vae_step), ("unet", self.cfg.unet_steps, self.unet_step),
                  ("direction", self.cfg.dir_steps, self.direction_step),
                  ("continuation", self.cfg.cont_steps, self.continuation_step))
        if self.state["phase"] == "done" and self.cfg.dir_steps > self._dir_done():
            # a finished run whose settings now ask for direction steps: go on with that phase
            self.state["phase"], self.state["step"] = "direction", self._dir_done()
        elif self.state["phase"] == "done" and self.cfg.cont_steps > self.state.get("cont_done", 0):
            self.state["phase"], self.state["step"] = "continuation", self.state.get("cont_done", 0)
        for name, total, fn in phases:
            if self.state["phase"] != name:
                continue
            self.state["losses"].setdefault(name, [])
            self.model.vae.train(name == "vae")
            self.model.unet.train(name != "vae")
            self.model.text_encoder.train(name != "vae")
            window, t_win = [], time.monotonic()
            while self.state["step"] < total:
                step = self.state["step"]
                window.append(fn(step))
                self.state["step"] = step + 1
                now = time.monotonic()
                self.state["wall"] = wall0 + now - start
                if len(window) == 50 or self.state["step"] == total:
                    avg = sum(window) / len(window)
                    self.state["losses"][name].append((self.state["step"], avg))
                    rate = (now - t_win) / len(window)
                    eta = (total - self.state["step"]) * rate
                    self.log(f"[{name}] step {self.state['step']}/{total}  loss {avg:.4f}  {rate:.2f} s/step  "
                             f"eta {eta / 60:.0f} min  (trained {self.state['wall'] / 60:.1f} min)")
                    window, t_win = [], now
                if now - last_ckpt > checkpoint_every:
                    self.checkpoint()
                    last_ckpt = now
                if stop_after is not None and now - start > stop_after:
                    self.checkpoint()
                    self.log(f"stopping after {stop_after:.0f} s; run again to resume")
                    return False
            if name == "vae":
                self.model.vae.eval()
                self.state["scale"] = self.measure_scale()
                self.log(f"[vae] latent scale from the data: {self.state['scale']:.5f} (SD uses 0.18215)")
                self.state["phase"], self.state["step"] = "unet", 0
                self.checkpoint()
            elif name == "unet":
                self.state["phase"], self.state["step"] = "direction", 0
            elif name == "direction":
                self.state["dir_done"] = self.state["step"]
                self.state["phase"], self.state["step"] = "continuation", self.state.get("cont_done", 0)
            else:
                self.state["cont_done"] = self.state["step"]
        self.state["phase"] = "done"
        self.checkpoint()
        return True

    def _dir_done(self) -> int:
        return self.state.get("dir_done", 0)

    def trained_model(self) -> VidRDModel:
        """The model to ship: trained VAE with the measured scale; the UNet and text encoder's EMA weights, or with
        ship="raw" the last step's."""
        assert self.state["scale"] is not None, "the VAE phase has not finished"
        m = self.model
        cfg = replace(m.config, vae=replace(m.config.vae, scaling_factor=round(self.state["scale"], 6)))
        m.vae.cfg = cfg.vae
        ema_unet = {k[len("unet."):]: v for k, v in self.ema.items() if k.startswith("unet.")}
        ema_text = {k[len("text_encoder."):]: v for k, v in self.ema.items() if k.startswith("text_encoder.")}
        if self.cfg.ship == "ema":
            m.unet.load_state_dict(ema_unet, strict=False)
            m.text_encoder.load_state_dict(ema_text, strict=False)
        for net in (m.unet, m.vae, m.text_encoder):
            net.eval().requires_grad_(False).to("cpu")
        return VidRDModel(cfg, m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler)


def with_direction(caption: str, shift: int) -> str:
    """`caption` with its direction word moved `shift` places along data.DIRECTIONS ("" stays "")."""
    cap = data.parse(caption)
    if cap is None:
        return caption
    d = data.DIRECTIONS
    return str(replace(cap, direction=d[(d.index(cap.direction) + shift) % len(d)]))


def bf16_available(device: torch.device) -> bool:
    """Whether bf16 is fast here (runtime.precision's one rule: bf16 tensor cores, or a CPU with bf16 units)."""
    from vidrd.runtime.precision import bf16_support
    return bf16_support(device)[0]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
