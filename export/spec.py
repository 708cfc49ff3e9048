"""One description per exported component: tensor names, dtypes, symbolic dims and their min/opt/max ranges.

The exporter, the graph checks, a TensorRT engine builder (optimisation profiles) and the runtime's buffer binding
all read these objects, so a name or a dynamic axis changes here only. `manifest.json` stores them as JSON
(`ComponentSpec.to_json`); the runtime should read them back with `read_specs(export_dir)`.

Shapes are tuples of ints (static), dim names ("N", "F", "h", "w") and scaled dims ("8*h": eight times h).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vidrd.ref.config import LATENT_FACTOR, ModelConfig

LATENT = LATENT_FACTOR  # pixels per latent cell (the VAE's down-sampling): h = height / 8
F_MAX = 32  # longest clip the exported UNet and temporal VAE accept: size of the precomputed frame-embedding table
TEXT_TOKENS = 77
# precision -> dtype of the float tensors of every component (bf16: AOTInductor packages only)
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_decoder_temporal")


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: min/opt/max for an optimisation profile; sizes must be multiples of `multiple`."""
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max) or any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"bad dim range min={self.min} opt={self.opt} max={self.max} multiple={self.multiple}")

    def check(self, name: str, value: int) -> None:
        if not (self.min <= value <= self.max) or value % self.multiple:
            raise ValueError(f"dim {name}={value} is outside [{self.min}, {self.max}]"
                             + (f" or not a multiple of {self.multiple}" if self.multiple > 1 else ""))


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype name (numpy spelling), shape of ints / dim names / "k*dim"."""
    name: str
    dtype: str
    shape: tuple

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given dim values, e.g. {"N": 2, "F": 8, "h": 32, "w": 32}."""
        out = []
        for s in self.shape:
            if isinstance(s, int):
                out.append(s)
            else:
                k, _, name = s.rpartition("*")
                if name not in dims:
                    raise ValueError(f"{self.name}: no value for dim {name!r} (given {sorted(dims)})")
                out.append(int(k or 1) * dims[name])
        return tuple(out)

    @property
    def torch_dtype(self):
        """The torch dtype of this tensor (torch.float32, torch.float16 or torch.int64)."""
        import torch
        return getattr(torch, self.dtype)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: s for i, s in enumerate(self.shape) if isinstance(s, str)}


@dataclass(frozen=True)
class ComponentSpec:
    """An exported graph: file name, inputs, outputs, dim ranges, the trace shape and the shapes checks run at."""
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Dim]
    example: dict[str, int]  # the shape the graph is traced at
    checks: tuple[dict, ...]  # shapes ONNX Runtime is compared with PyTorch at: each differs from `example`
    notes: str = ""
    io: dict = field(default_factory=dict, compare=False)  # name -> TensorSpec, filled in __post_init__

    def __post_init__(self):
        object.__setattr__(self, "io", {t.name: t for t in self.inputs + self.outputs})
        for d in (self.example, *self.checks):
            self.check_dims(d)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_dims(self, dims: dict[str, int]) -> None:
        """Raise ValueError unless `dims` gives every dim of this component a value within its range."""
        if set(dims) != set(self.dims):
            raise ValueError(f"{self.name}: dims {sorted(dims)} given, expected {sorted(self.dims)}")
        for k, v in dims.items():
            self.dims[k].check(k, v)

    def shape(self, tensor: str, dims: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape of input or output `tensor` (e.g. for a buffer) at the given dim values."""
        if tensor not in self.io:
            raise ValueError(f"{self.name} has no tensor {tensor!r}; it has {sorted(self.io)}")
        return self.io[tensor].resolve(dims)

    def request_dims(self, batch: int, frames: int, height: int, width: int, guidance: bool) -> dict[str, int]:
        """The dims this component sees for B prompts of F frames at H x W pixels (see `request_dims`)."""
        return request_dims(self.name, batch, frames, height, width, guidance)

    def profile(self) -> dict[str, tuple[tuple, tuple, tuple]]:
        """Input name -> (min, opt, max) shapes: one TensorRT optimisation profile."""
        pick = {k: {a: getattr(d, a) for a in ("min", "opt", "max")} for k, d in self.dims.items()}
        return {t.name: tuple(t.resolve({k: v[a] for k, v in pick.items()}) for a in ("min", "opt", "max"))
                for t in self.inputs}

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file,
                "inputs": [_tensor_json(t) for t in self.inputs], "outputs": [_tensor_json(t) for t in self.outputs],
                "dims": {k: vars(d) for k, d in self.dims.items()}, "example": self.example,
                "checks": list(self.checks), "notes": self.notes}

    @classmethod
    def from_json(cls, d: dict) -> "ComponentSpec":
        def tensor(t):
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
        return cls(d["name"], d["file"], tuple(map(tensor, d["inputs"])), tuple(map(tensor, d["outputs"])),
                   {k: Dim(**v) for k, v in d["dims"].items()}, d["example"], tuple(d["checks"]), d.get("notes", ""))


def request_dims(component: str, batch: int, frames: int, height: int, width: int,
                 guidance: bool) -> dict[str, int]:
    """The dims `component` sees for B prompts of F frames at H x W pixels: what the exporter's ranges, the engine
    profiles and the runtime's shape checks all compare (N = 2B under classifier-free guidance)."""
    n, h, w = (2 if guidance else 1) * batch, height // LATENT, width // LATENT
    if component == "text_encoder":
        return {"B": n}
    if component == "unet":
        return {"N": n, "F": frames, "h": h, "w": w}
    if component == "vae_decoder":
        return {"N": batch * frames, "h": h, "w": w}  # ((B F),C,h,w) frames
    assert component == "vae_decoder_temporal", component
    return {"B": batch, "F": frames, "h": h, "w": w}  # one video per prompt


def _tensor_json(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def component_specs(cfg: ModelConfig, precision: str = "fp32") -> dict[str, ComponentSpec]:
    """The four exported components of a model with configs `cfg`, float tensors in `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    ft = PRECISIONS[precision]
    c, d_ctx, d_text = cfg.unet.in_channels, cfg.unet.cross_attention_dim, cfg.text.hidden_size
    up = 2 ** (len(cfg.unet.block_out_channels) - 1)  # h, w must survive every UNet down-sampling exactly
    px = f"{2 ** (len(cfg.vae.block_out_channels) - 1)}*"  # pixels per latent cell: "8*"
    opt = cfg.unet.sample_size
    lat = Dim(min(8, up), opt, max(64, opt), up)
    vae_lat = Dim(8, opt, max(64, opt))
    frames = Dim(2, 8, F_MAX)
    raw = ("raw decoder output (same as VidRD vae.decode): the runtime rescales with x/2+0.5 and clamps to [0,1]; "
           "`latents` are already divided by the VAE scaling factor")
    return {
        "text_encoder": ComponentSpec(
            "text_encoder", "text_encoder.onnx",
            (TensorSpec("input_ids", "int64", ("B", TEXT_TOKENS)),),
            (TensorSpec("last_hidden_state", ft, ("B", TEXT_TOKENS, d_text)),),
            {"B": Dim(1, 2, 16)}, {"B": 3}, ({"B": 1}, {"B": 4}),
            "CLIP text model; last_hidden_state is the UNet context (no final projection, no pooled output)"),
        "unet": ComponentSpec(
            "unet", "unet.onnx",
            (TensorSpec("sample", ft, ("N", c, "F", "h", "w")), TensorSpec("timestep", "float32", ("N",)),
             TensorSpec("encoder_hidden_states", ft, ("N", TEXT_TOKENS, d_ctx))),
            (TensorSpec("noise_pred", ft, ("N", cfg.unet.out_channels, "F", "h", "w")),),
            {"N": Dim(1, 2, 8), "F": frames, "h": lat, "w": lat},
            {"N": 2, "F": 3, "h": 3 * up, "w": 2 * up},
            ({"N": 1, "F": 2, "h": up, "w": 2 * up}, {"N": 3, "F": 5, "h": 2 * up, "w": up}),
            f"N = 2B under classifier-free guidance; timestep is float32 in both precisions (its sinusoid is "
            f"computed in fp32 as in the reference); F >= 2 (F = 1 takes another path in the reference); "
            f"F <= {F_MAX} (frame-embedding table); h, w multiples of {up}"),
        "vae_decoder": ComponentSpec(
            "vae_decoder", "vae_decoder.onnx",
            (TensorSpec("latents", ft, ("N", cfg.vae.latent_channels, "h", "w")),),
            (TensorSpec("frames", ft, ("N", cfg.vae.out_channels, px + "h", px + "w")),),
            {"N": Dim(1, 8, 32), "h": vae_lat, "w": vae_lat},
            {"N": 3, "h": 12, "w": 8}, ({"N": 1, "h": 8, "w": 8}, {"N": 5, "h": 16, "w": 8}),
            "per-frame decode, as the official pipeline does (temporal layers inactive); N = B*F frames; " + raw),
        "vae_decoder_temporal": ComponentSpec(
            "vae_decoder_temporal", "vae_decoder_temporal.onnx",
            (TensorSpec("latents", ft, ("B", cfg.vae.latent_channels, "F", "h", "w")),),
            (TensorSpec("frames", ft, ("B", cfg.vae.out_channels, "F", px + "h", px + "w")),),
            {"B": Dim(1, 1, 4), "F": frames, "h": vae_lat, "w": vae_lat},
            {"B": 2, "F": 3, "h": 8, "w": 12}, ({"B": 1, "F": 2, "h": 8, "w": 8}, {"B": 3, "F": 5, "h": 8, "w": 16}),
            f"decode with the temporal convolutions over each video's F frames (SPEC §4.1 fix); 2 <= F <= {F_MAX}; "
            + raw),
    }


def read_specs(export_dir) -> dict[str, ComponentSpec]:
    """The component specs recorded in `export_dir`/manifest.json (what the runtime binds buffers from)."""
    path = Path(export_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {export_dir} (make one with `vidrd export --out {export_dir}`)")
    manifest = json.loads(path.read_text())
    return {k: ComponentSpec.from_json(v["spec"]) for k, v in manifest["components"].items()}
