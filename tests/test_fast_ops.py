"""--fast-ops (runtime/fast_ops.py): each kernel against the one it replaces, the copies share the model's weights and
leave the model as it is, the runtime with them stays within float rounding on the trained model, options refused
where they cannot apply."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tolerances import CHUNKED_VS_FLASH_ERROR, FAST_OPS_LATENT_REL, FAST_OPS_VIDEO, FRAME_CONV
from vidrd.ref import attention as attn
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.unet_blocks import TemporalConv
from vidrd.ref.weights import random_model
from vidrd.runtime.backends import fast_ops
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(2, 32, 8, 4, 4), (1, 64, 4, 1, 1), (2, 32, 5, 3, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_frame_conv_matches_the_conv3d(shape, layout):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(shape[1], shape[1], (3, 1, 1), padding=(1, 0, 0))
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    b, c, f, h, w = shape
    x = torch.randn(b, c, f, h, w, generator=g)
    if layout == "transposed":  # what conv2d_5d hands on: (B,F,C,h,w) storage seen as (B,C,F,h,w)
        x = torch.randn(b, f, c, h, w, generator=g).transpose(1, 2)
    fc = fast_ops.FrameConv(conv)
    assert fc.conv.weight is conv.weight
    with torch.no_grad():
        want, got = conv(x), fc(x)
    assert got.shape == want.shape and (got - want).abs().max() <= FRAME_CONV


def _attention(shape, kv_len, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, heads, lq, dh = shape
    q = torch.randn(shape, generator=g).to(dtype)
    k, v = (torch.randn(n, heads, kv_len, dh, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def test_chunked_bf16_attention_is_as_accurate_as_the_flash_kernel():
    q, k, v = _attention((2, 2, 300, 64), 260, torch.bfloat16)
    scale = 64 ** -0.5
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    flash = F.scaled_dot_product_attention(q, k, v, scale=scale)
    before = torch.backends.mkldnn.matmul.fp32_precision
    got = attn.chunked(q, k, v, scale)
    assert torch.backends.mkldnn.matmul.fp32_precision == before  # the oneDNN setting is put back
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert _rel(got, ref) <= CHUNKED_VS_FLASH_ERROR * _rel(flash, ref)
    assert attn.attend(q, k, v, scale, "chunked").equal(got)


@pytest.mark.parametrize("case", ["fp32", "short keys", "short queries"])
def test_chunked_leaves_the_rest_to_sdpa(case):
    """float32 (no faster in chunks) and sequences under CHUNKED_MIN_LEN run SDPA itself: bit for bit."""
    short = attn.CHUNKED_MIN_LEN - 1
    shape, kv_len, dtype = {"fp32": ((1, 2, 300, 64), 300, torch.float32),
                            "short keys": ((1, 2, 300, 64), 77, torch.bfloat16),
                            "short queries": ((1, 2, short, 64), 300, torch.bfloat16)}[case]
    q, k, v = _attention(shape, kv_len, dtype)
    assert attn.chunked(q, k, v, 0.125).equal(F.scaled_dot_product_attention(q, k, v, scale=0.125))


def test_apply_makes_a_copy_that_shares_the_weights():
    model = random_model("tiny", 0)
    before = {k: v.data_ptr() for k, v in model.unet.state_dict().items()}
    unet = fast_ops.apply(model.unet, chunked_attention=True)
    assert unet is not model.unet
    assert {v.data_ptr() for v in unet.state_dict().values()} == set(before.values())
    assert {k: v.data_ptr() for k, v in model.unet.state_dict().items()} == before
    temporal = [m for m in unet.modules() if isinstance(m, TemporalConv)]
    assert temporal and all(not isinstance(c, nn.Conv3d) for m in temporal for c in m.convs)
    conv3d = sum(isinstance(c, nn.Conv3d) for m in model.unet.modules() if isinstance(m, TemporalConv) for c in m.convs)
    assert sum(isinstance(c, fast_ops.FrameConv) for m in temporal for c in m.convs) == conv3d > 0
    assert not any(isinstance(m, fast_ops.FrameConv) for m in model.unet.modules())  # the model's own: untouched
    assert {m.backend for m in unet.modules() if isinstance(m, attn.Attention)} == {"chunked"}
    assert {m.backend for m in model.unet.modules() if isinstance(m, attn.Attention)} == {"sdpa"}
    assert {m.backend for m in fast_ops.apply(model.unet, chunked_attention=False).modules()
            if isinstance(m, attn.Attention)} == {"sdpa"}
    from vidrd.runtime import backends  # the backends: chunked attention only where the UNet runs eagerly
    eager = backends.make("torch", "unet", model, torch.float32, torch.device("cpu"), fast_ops=True)
    assert {m.backend for m in eager.net.modules() if isinstance(m, attn.Attention)} == {"chunked"}
    compiled = backends.make("torch", "unet", model, torch.float32, torch.device("cpu"), compile="default",
                             fast_ops=True)  # compiles on its first call, which this test does not make
    assert {m.backend for m in compiled.net.modules() if isinstance(m, attn.Attention)} == {"sdpa"}
    assert any(isinstance(m, fast_ops.FrameConv) for m in compiled.net.modules())
    attn.set_attention(model.unet, "math")  # an attention backend the user chose is kept
    assert {m.backend for m in fast_ops.apply(model.unet, chunked_attention=True).modules()
            if isinstance(m, attn.Attention)} == {"math"}


@pytest.fixture(scope="module")
def shapes_model():
    from vidrd.ref.weights import load_dir
    from vidrd.runtime.shapes import MODEL_DIR
    return load_dir(MODEL_DIR)


@pytest.mark.parametrize("temporal", [False, True], ids=["per-frame", "temporal"])
def test_runtime_with_fast_ops_stays_within_rounding(shapes_model, temporal):
    """The trained model, float32, 2 clips: --fast-ops (temporal convolutions as 2-D ones, the per-frame decode a
    frame per call) against the default kernels; the backends run copies, the model's modules stay as they were."""
    s = SamplerSettings(height=64, width=64, frames=8, steps=4, clips=2, overlap=4, temporal_decode=temporal)
    request = Request(("a red circle moving right on a black background",), ("",), s, seed=3, float_video=True)
    runs = {}
    for fast in (False, True):
        rt = open_runtime(shapes_model, RuntimeOptions(fast_ops=fast, device="cpu"), Limits.of(s, 1))
        assert rt.vae.frame_at_a_time is fast and (rt.unet.net is shapes_model.unet) is not fast
        clips = list(rt.generate(request))
        runs[fast] = torch.stack([c.latents for c in clips]), torch.cat([c.video for c in clips], dim=2)
        rt.close()
    (lat, video), (fast_lat, fast_video) = runs[False], runs[True]
    assert (fast_lat - lat).abs().max() <= FAST_OPS_LATENT_REL * lat.abs().max()
    assert (fast_video - video).abs().max() <= FAST_OPS_VIDEO  # may be 0 where the kernels happen to agree
    assert not any(isinstance(m, fast_ops.FrameConv) for m in (*shapes_model.unet.modules(), *shapes_model.vae.modules()))


@pytest.mark.parametrize("options, what", [
    (dict(backend="onnxruntime", export_dir="x"), "exported graphs"),
    (dict(unet_backend="tensorrt", vae_backend="onnxruntime", export_dir="x", engine_dir="e"), "exported graphs"),
    (dict(backend="reference"), "--backend reference"),
])
def test_fast_ops_and_chunked_attention_refused_where_they_cannot_apply(options, what):
    with pytest.raises(ValueError, match=f"^--fast-ops applies to the torch UNet and VAE decoder, not {what}"):
        RuntimeOptions(**options, fast_ops=True)
    RuntimeOptions(**options, fast_ops=False)
    RuntimeOptions(unet_backend="onnxruntime", export_dir="x", fast_ops=True)  # the VAE decoder is torch's
    with pytest.raises(ValueError, match="^--fast-ops 'yes' must be True or False"):
        RuntimeOptions(fast_ops="yes")
    with pytest.raises(ValueError, match="^--attention chunked loops over .* drop --compile"):
        RuntimeOptions(attention="chunked", compile="default")
    RuntimeOptions(fast_ops=True, compile="default")  # compiled: the fast ops keep SDPA


@pytest.mark.parametrize("command", [["generate", "x", "-o", "v.mp4"], ["bench"], ["eval"], ["serve"]],
                         ids=lambda c: c[0])
def test_fast_ops_is_an_execution_flag_everywhere(command):
    from vidrd.runtime.cli import parser
    from vidrd.runtime.cli.args import runtime_options
    from vidrd.runtime.cli.args import explicit_args

    p = parser()
    for flags, value in (([], False), (["--fast-ops"], True), (["--no-fast-ops"], False)):
        args = p.parse_args(command + flags)
        assert runtime_options(args).fast_ops is value
        if command[0] != "serve":
            assert ("fast_ops" in explicit_args(args)) is bool(flags)
