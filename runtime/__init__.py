"""The lean runtime: backends, buffers, the reuse-and-diffuse loop, CLI."""
