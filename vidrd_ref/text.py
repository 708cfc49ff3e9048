"""Text side: the CLIP tokenizer and the CLIP text encoder (transformers), as SD2.1-base ships them."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .config import TextConfig

MAX_TOKENS = 77


class TextEncoder(nn.Module):
    """transformers CLIPTextModel under the official key prefix `text_model.`. ids (B,77) -> last hidden (B,77,D)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import CLIPTextModel
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # config sanity warnings about pooling ids do not concern last_hidden_state
        try:
            self.text_model = CLIPTextModel(cfg.to_hf())
        finally:
            hf_logging.set_verbosity(verbosity)
        # transformers 4.30 (the release) saved position_ids; newer versions made it non-persistent (SPEC §4.15).
        emb = self.text_model.embeddings
        emb.register_buffer("position_ids", emb.position_ids, persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids).last_hidden_state


def load_tokenizer(folder: Path):
    """CLIPTokenizer from a tokenizer folder; SD2.1's special_tokens_map pads with "!" (id 0, SPEC §0)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise FileNotFoundError(f"tokenizer folder {folder} needs vocab.json and merges.txt")
    # from_pretrained, not CLIPTokenizer(vocab_file=...): the latter silently builds a 3-token vocabulary.
    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> ids (B,77): padded to 77 with the tokenizer's pad id, truncated."""
    out = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return out.input_ids


def dropped_words(tokenizer, prompt: str) -> str:
    """The part of `prompt` that truncation to 77 tokens drops ('' when it fits)."""
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= MAX_TOKENS:
        return ""
    return tokenizer.decode(ids[MAX_TOKENS - 1:-1])
