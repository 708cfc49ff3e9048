"""vidrd-shapes: procedural shape videos (data), training (train), the quality harness (harness, `vidrd eval`) and
the trained model that ships as vidrd's embedded default (model/)."""
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"  # official layout, fp16 safetensors, MODEL_CARD.md
NAME = "vidrd-shapes"
# Sampler settings that suit the embedded model where the user gives none: its training resolution, a step count
# that is quick on a CPU, three clips; and the long-video loop that measured best on it (BENCHMARKS.md, motion across
# clips): forward continuation, the repeated overlap frames trimmed, overlap frames pinned for 80% of the steps.
# The rest are the official defaults.
SETTINGS = {"height": 64, "width": 64, "frames": 8, "steps": 25, "clips": 3, "continuation": "forward",
            "assembly": "trim", "denoise_guidance": 0.8}
NEGATIVE = ""  # its unconditional caption in training (caption dropout), so the default negative prompt
DEMO_PROMPT = "a red circle moving right on a black background"
