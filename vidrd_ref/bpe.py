"""A small CLIP-format BPE vocabulary for models made without released files (init-random, the embedded default).

The released model uses SD2.1's 49,408-token CLIP vocabulary, which cannot ship here; this writes a byte-level
vocabulary in the same file format (vocab.json, merges.txt, pad "!" = id 0) with merges learned from a short
built-in text, so that CLIPTokenizer.from_pretrained loads it like the real one.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CORPUS = """a the of and in on with at is are an to from by for boat sailing lake river sea ocean waves beach
wood fire burning flames smoke forest trees mountain snow sky clouds sunset sunrise city street night lights
car driving road dog cat bird flying horse running man woman person walking dancing people crowd water rain
flower garden field grass wind moving slow motion camera aerial view close up timelapse beautiful cinematic"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of CLIP's byte-level BPE, in CLIP's vocabulary order (so "!" is id 0)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]


def learn_merges(text: str, n: int) -> list[tuple[str, str]]:
    """Greedy BPE: the n most frequent adjacent pairs, merged one after another; words end in '</w>'."""
    words = Counter(text.lower().split())
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tokenizer(folder: Path, merges: int = 200, corpus: str = CORPUS) -> Path:
    """Write vocab.json, merges.txt and the two SD2.1 tokenizer configs into `folder`; returns it.

    Merges are learned from `corpus` (at most `merges`; fewer when every word of it is already one token).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    pairs = learn_merges(corpus, merges)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": True,
         "add_prefix_space": False, "errors": "replace", "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return folder
