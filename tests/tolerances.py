"""Every numerical tolerance of the test suite and of the GPU check, with the reason it is not exact. Tests import
them from here; `./dev gpu-check` (runtime/gpu_check.py) reads its bounds from this file too.

Exact equality (torch.equal, np.array_equal) is asserted only where the two sides run the same arithmetic by
construction: the same kernels on the same shapes and memory layout, in the same process and thread. Wherever the
two sides differ in kernels (ONNX Runtime, Triton, inductor), summation order (buffer sizes, thread counts, CPU
dispatch level: ATEN_CPU_CAPABILITY default/avx2/avx512), precision or a lossy encoder, the bound is here.

The suite passes with these bounds on an AVX-512 CPU under ATEN_CPU_CAPABILITY=default, avx2 and avx512 with 1 and 2
torch threads (README, Tests); where a value was measured for the bound, the comment says so.
"""
import numpy as np
import torch

# --- kernels (tests/test_kernels.py) -------------------------------------------------------------------------
# Triton attention (interpreter, fp32 after loads) vs torch SDPA in fp32: max abs and rel error per output dtype.
# Different summation order (online softmax in blocks vs SDPA's); fp16/bf16 outputs add one rounding of the output.
ATTENTION = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The tiny UNet with every attention through Triton vs through SDPA, max abs error relative to max(1, max |output|):
# ~20 attention calls whose fp32 summation-order differences pass through convolutions and group norms. Measured
# 1.6e-6 to 2.2e-6 on the seeded inputs (default/avx2/avx512); an unseeded draw can reach 3e-4, so every input is seeded.
TRITON_UNET_REL = 1e-3
# Fused GroupNorm+SiLU and GEGLU (kernels/fused.py; tests/test_fused_kernels.py), interpreter, vs the unfused torch
# ops in float64 on the same (rounded) inputs: (atol, rtol) per dtype. fp32: another summation order (shifted tile
# sums) and fp32 erf/sigmoid; measured 4.5e-7 to 1.9e-6 (GroupNorm, |out| <= 6) and 3.4e-6 to 8e-6 (GEGLU, |out| ~
# 100, i.e. < 1e-7 relative). fp16: one rounding of the output (2^-11 relative), measured 4.4e-4 to 3.0e-3
# (GroupNorm) and up to 0.03 at |out| ~ 100 (GEGLU). bf16 is checked on CUDA only (the interpreter gets bf16
# wrong), by `python -m vidrd.kernels.bench_fused --check` against its TOL.
FUSED = {torch.float32: (5e-6, 5e-6), torch.float16: (1e-3, 2e-3)}
# GroupNorm of inputs with |mean| >> std (mean 100, std 2), fp32: the fused kernel's max abs error vs float64 at most
# this multiple of torch's own fp32 error (shifted sums avoid E[x^2] - E[x]^2 cancellation); measured 0.78x.
FUSED_GN_LARGE_MEAN_VS_TORCH = 2.0

# --- model, sampler and runtime against the reference and the golden tensors of the official code ----------------
GOLDEN = 1e-4  # max abs, [0,1] video or activations vs the official code's golden tensors (other torch version/CPU)
GOLDEN_LATENT_REL = 1e-4  # max abs relative to max |latent|, final latents vs the goldens
DDIM_TABLE = 1e-6  # max abs, alphas_cumprod (float32 cumprod) vs the goldens: rounding of a 1000-term product
DDIM_STEP = 1e-5  # max abs, the DDIM update vs its closed form: fp32 rounding of a few operations
UNET_BATCH_ROW = 1e-5  # max abs, a UNet batch row vs the same row alone: batched GEMM/conv blocking differs
RUNTIME_LATENT_REL = 1e-5  # runtime vs reference sampler, fp32 torch: max abs relative to max |latent|
RUNTIME_VIDEO = 1e-5  # runtime vs reference sampler, fp32 torch: max abs of the [0,1] video
# uint8 frames are the truncating conversion (x * 255 -> uint8) of a video that agrees to RUNTIME_VIDEO: a value
# within 1e-5 of an integer boundary may fall on the other side, so frames agree to one level, and almost all exactly.
UINT8_LEVELS = 1
UINT8_DIFFERENT_FRACTION = 1e-3
ORT_LATENT_REL = 1e-3  # ONNX Runtime (CPU EP) vs the torch reference, 3+ steps: other conv/GEMM kernels, fused ops
ORT_VIDEO = 1e-3  # same, max abs of the [0,1] video
EXPORT_FP32 = 1e-4  # max abs, one exported component on ONNX Runtime vs PyTorch, one call
BF16_VAE_VIDEO = 0.05  # max abs of the [0,1] video with a bf16 VAE beside the fp32 UNet (8-bit mantissa)
BF16_LATENT_REL_NORM = 0.05  # bf16 networks vs fp32, no guidance, 2 steps: relative L2 error of the latents
ORT_UINT8_LEVELS = 1  # uint8 frames of videos that agree to ORT_VIDEO (0.26 levels): truncation moves one level
COMPILE_UINT8_LEVELS = 1  # uint8 frames, torch.compile (inductor with freezing: fused, reordered ops) vs eager
# --vae-channels-last vs the default layout, the same latents: other oneDNN/cuDNN convolution kernels (channels-last
# blocking, another summation order) in every 2-D convolution of the VAE decoder; max abs of the [0,1] video. Measured:
# 3.3e-5 on the small preset (6.6e-5 on the raw decoder output, 8 frames of 32x32 latents, one thread) and 2.6e-6 to
# 3.2e-6 on the tiny random model (per frame and temporal, batch 1 and 2), i.e. within RUNTIME_VIDEO there, which the
# preset tests' uint8 comparisons with the reference sampler rely on.
VAE_CHANNELS_LAST_VIDEO = 1e-4
VAE_CHANNELS_LAST_UINT8_LEVELS = 1  # uint8 frames of videos within VAE_CHANNELS_LAST_VIDEO: truncation moves one level
# --fast-ops (runtime/fast_ops.py). FrameConv vs the Conv3d it replaces: another kernel, another summation order over
# 3 x C inputs; max abs. chunked bf16 attention vs float64: its relative L2 error at most this multiple of the CPU
# flash kernel's (both round q, k, v and the weights to bf16; measured 2.35e-3 vs 2.25e-3 at 1024 tokens).
FRAME_CONV = 1e-5
CHUNKED_VS_FLASH_ERROR = 1.25
# The runtime with --fast-ops vs without, the trained vidrd-shapes model, float32: relative latent error and max abs
# of the [0,1] video. Not the tiny random model: its deepest GroupNorms (1x1 latents, a few values a group) amplify
# float rounding about 1e4-fold, so its runs that differ in rounding cannot be compared (README, Tests). Measured on
# the test's request: latents 5.5e-6 to 6.0e-6, video 1.2e-5 to 1.3e-5 (default and AVX2 dispatch, one thread).
FAST_OPS_LATENT_REL = 1e-4
FAST_OPS_VIDEO = 1e-3
# A job of a batch of jobs (runtime/batch.py) vs the same request alone, the trained vidrd-shapes model, float32: the
# UNet, text encoder and VAE run on more rows at once (other GEMM/convolution blocking, UNET_BATCH_ROW), and the
# rounding passes through the steps and clips; relative latent error and max abs of the [0,1] video. Measured on
# tests/test_batch.py's requests (3 steps x 2-3 clips, one thread): latents up to 1.0e-5, video up to 2.6e-5.
BATCHED_LATENT_REL = 1e-4
BATCHED_VIDEO = 1e-3
# Feature reuse (tests/test_reuse.py), tiny random UNet: a "reuse" call on the next step's latents and timestep (x +
# 0.05 noise, t 500 -> 480) against the full UNet there, max abs relative to max |full|. Not rounding: the deep
# features are one step stale by design (DeepCache); a random UNet is a harsher case than a trained one, whose deep
# features change more slowly. Measured 0.134 (depth 1; the whole stale output is off by 0.153).
REUSE_NEXT_STEP_REL = 0.2
# eps_c + (g-1)(eps_c - eps_u) vs eps_u + g(eps_c - eps_u) with the same fresh d: the same value in exact arithmetic,
# fp32 rounding of three operations on values ~10x the inputs (g = 7.5), max abs relative to max |eps|. Measured 1.1e-7.
GUIDANCE_REUSE_FRESH_REL = 1e-6
# The runtime with reuse settings (feature reuse, guidance reuse, both; DDIM and DPM-Solver++) vs the reference sampler
# with the same settings, fp32 torch: the same plan and the same arithmetic term by term (the conditional-only call is
# the same batch-B UNet call on the context's second half; eps_c + (g-1) d_last with g-1 rounded to float32 once on
# both sides), so only what makes RUNTIME_LATENT_REL / RUNTIME_VIDEO nonzero can differ. Measured 0 on one thread.
REUSE_RUNTIME_LATENT_REL = 1e-5  # max abs relative to max |latent|
REUSE_RUNTIME_VIDEO = 1e-5  # max abs of the [0,1] video
# An enabled reuse option must move the final latents by more than this (relative L2) on the tiny random model, far
# above rounding: measured 0.007 (guidance reuse after 0.5, 8 steps) to 0.09 (feature reuse every 2 steps).
REUSE_EFFECT_MIN_REL = 1e-3

# AOTInductor (tests/test_aoti.py): torch.export's program vs the eager module, one call, max abs relative to
# max(1, max |output|): the same ATen kernels, but the program may decompose and reorder some ops. The runtime on
# packages (inductor's fused C++ kernels) vs the torch backend is held to the ONNX Runtime bounds (ORT_LATENT_REL,
# ORT_VIDEO): the same kind of difference, other fused kernels.
AOTI_COMPONENT = 1e-4
# --dtype fp8 (runtime/backends/fp8.py; tests/test_fp8.py). e4m3 keeps 3 mantissa bits: a quantized row is within
# ~3.6% (rel L2) of itself; measured 3.2% (worst row, per-row scales) and 4.0% (per-tensor). A GEMM of two quantized
# operands vs the float32 matmul: both errors, measured 3.6% and 3.5%. torch._scaled_mm vs its float32 definition
# (scaled_mm_reference): the bf16 output's rounding, measured 2.6e-3 and 2.1e-3 (this torch's CPU _scaled_mm).
FP8_DEQUANT_REL = 0.06
FP8_GEMM_REL = 0.06
FP8_SCALED_MM_VS_REFERENCE = 5e-3
# The tiny random UNet with every swapped GEMM in FP8 vs the same UNet in bf16, 16x16 latents, rel L2: ~50 GEMMs'
# errors through random weights (bf16 alone is 2.5% from fp32 there). Measured 0.112-0.125 (per-row and per-tensor).
FP8_UNET_REL = 0.2
# The runtime with --dtype fp8 vs bf16 on the tiny random model (64x64, 3 steps, 2 clips), PSNR of the videos:
# measured 21.2 dB on the CPU's _scaled_mm (bf16 vs fp32 is 29.9 dB on the same request: the 1x1 deepest latents of
# a random model amplify any rounding). The GPU test holds cuBLAS's FP8 GEMMs to the same bound.
FP8_TINY_PSNR_DB = 15
EXPORT_FP16 = 5e-2  # max abs, one fp16-exported component on ONNX Runtime vs the fp32 model: 10-bit mantissa
# v prediction and epsilon prediction read the same UNet output differently: their final latents must differ by far
# more than rounding (relative to max |latent|), or a runtime that ignored prediction_type would pass the v test.
V_VS_EPSILON_MIN_REL = 0.1
SDPA_SLICES = 1e-6  # max abs, SDPA in batch slices vs one call: the same kernel per row, blocking may differ
UNET_SDPA_SLICES = 1e-5  # max abs, the tiny UNet with its SDPA calls in batch slices vs whole: the above, propagated
PSNR_ROUNDING_DB = 1e-3  # a PSNR computed from a known MSE: float32 rounding of the mean and the log

# --- statistics and exact solutions -----------------------------------------------------------------------------
# noise prior a = 2: per-frame variance (1) and lag-1 correlation (2/sqrt(5)) estimated from 65,536 draws per frame;
# the estimates' standard deviation is ~0.006, so 0.05 is ~8 sigma (seeded: the bound only guards the formula).
NOISE_PRIOR_STATS = 0.05
# recycle weight 1000: a restarted frame is r/sqrt(1+r^2) x_prev + N(0,1)/sqrt(1+r^2), i.e. x_prev up to ~1e-3 noise
# (max over a few hundred values ~4e-3): the frame a restart reads is identified to 1e-2.
RECYCLE_1000 = 1e-2
POINT_MASS_FP64 = 1e-9  # DPM-Solver++ on a point mass in float64: exact in exact arithmetic, 7 steps of fp64 rounding
# the latent scale (1/std of the VAE's latents, measured in training) vs the one written into the model's config (a
# JSON float through float32), or vs a resumed run's (the same statistics reduced in another order): relative error
# of a few float32 roundings, rounded up
LATENT_SCALE_REL = 1e-5
# training resumed from a checkpoint vs run uninterrupted: the same arithmetic up to the order of reductions of the
# checkpointed optimizer state, max abs over parameters
RESUME_PARAMS = 1e-6
# effects that must show: a change must exceed these, well above rounding (max abs of [0,1] video or activations)
TEMPORAL_DECODE_EFFECT = 1e-3  # the temporal VAE layers change the decoded video
FRAME_MIXING_EFFECT = 1e-4  # changing one frame changes another frame's UNet output (5-D GroupNorm, temporal layers)

# --- encoded outputs --------------------------------------------------------------------------------------------
# H.264 (crf 17, 4:2:0 chroma) of the same video, decoded, vs the reference's frames: compared as 4x4 block means,
# and required to be much closer than a different seed's video (the ratio), since the codec loses detail.
H264_VS_OTHER_SEED = 0.3
# The service's mp4 vs `vidrd generate`'s mp4 of the same request: mean abs difference in levels of the decoded
# frames. The two runtimes differ in buffer sizes and thread, so kernels may round differently; H.264 turns a
# one-level change into a changed macroblock, so differences are local but not bounded per pixel. Measured: 0.17
# and 0.29 (max 14 levels in 3-4% of pixels); a different seed differs by tens of levels.
SERVICE_VS_CLI_MP4_MEAN = 1.0
# The same for a job of `vidrd serve --batch-jobs K` (the trained embedded model) against its request alone: the
# uint8 frames differ by one level in 0-3e-4 of the values (BATCHED_VIDEO), and H.264 turns each such change into a
# changed macroblock. Measured: 0.0 to 1.05 (max 28 levels); another job's video differs by tens of levels on average.
BATCHED_MP4_MEAN = 2.5

# --- TensorRT (tests/test_engines.py; GPU only) -----------------------------------------------------------------
TRT_FP32 = 1e-3  # max abs error, TensorRT fp32 (TF32 off) vs ONNX Runtime on the CPU
TRT_RUNTIME_VIDEO = 2e-2  # max abs error of [0,1] video, runtime with the TensorRT UNet vs the torch UNet, 3 steps

# --- CUDA (tests marked gpu in test_gpu_paths.py, and ./dev gpu-check) ---------------------------------------------
FP16_GPU_VIDEO = 0.2  # max abs of [0,1] video, fp16 networks (fp32 VAE) vs fp32 on CUDA, tiny random model, 3 steps
BENCH_FP32_PSNR_DB = 60  # `vidrd bench` tiny workload on CUDA, fp32 runtime vs fp32 reference: kernels only differ
BENCH_FP16_PSNR_DB = 20  # the same in fp16 (guidance 10 on random weights amplifies fp16 rounding: BENCHMARKS.md)
# gpu-check parity: the official code's golden tensors (CPU) vs CUDA fp32 with TF32 off, max abs relative to
# max(1, |golden|). Networks: other conv/GEMM kernels; pipelines: 10 guided DDIM steps amplify that rounding.
GPU_NETWORKS = 1e-3
GPU_PIPELINES = 5e-3
# gpu-check: the UNet with Triton attention vs SDPA attention, relative L2 error, per dtype of the networks
GPU_TRITON_UNET_REL_L2 = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GPU_BACKEND_PSNR_DB = 40  # gpu-check: ONNX Runtime, TensorRT fp32 and reduce-overhead fp32 videos vs torch eager
# gpu-check fp8: the quality gate, a video of the sd21-base random weights (10 steps) with --dtype fp8 against
# the same request in bf16
GPU_FP8_PSNR_DB = 35
GPU_BEST_PSNR_DB = 20  # gpu-check sd21-base: a configuration counts for "best" within this PSNR of the fp32 reference


def assert_uint8_close(got, want) -> None:
    """uint8 frames of two videos that agree to RUNTIME_VIDEO: within UINT8_LEVELS, almost all equal (truncation)."""
    diff = np.abs(np.asarray(got).astype(np.int16) - np.asarray(want).astype(np.int16))
    assert diff.shape and diff.max() <= UINT8_LEVELS and (diff > 0).mean() <= UINT8_DIFFERENT_FRACTION, \
        f"uint8 frames differ: max {diff.max()} levels, {(diff > 0).mean():.2e} of values"
