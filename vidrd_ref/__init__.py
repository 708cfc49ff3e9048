"""The reference VidRD model and sampler (SPEC §1-§4)."""
