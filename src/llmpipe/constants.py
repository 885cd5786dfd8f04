"""Facts shared by planning code (``llmpipe.estimate``, the Snakemake planner) and running code
(evaluation, fine-tuning, config checks).

Standard library only, importing nothing of ``llmpipe``: any module may import it without pulling
in the estimator, numpy or torch, so planning and running code never import each other.
"""

from __future__ import annotations

MIB = 1024**2
GIB = 1024**3

# A variant quantized with an importance matrix: "Q4_K_M-imat" stores exactly Q4_K_M's bits.
IMATRIX_SUFFIX = "-imat"

# Planning sizes text in tokens before any tokenizer is loaded: English BPE averages ~4 UTF-8
# bytes per token; 3 leaves room.
BYTES_PER_TOKEN = 3

# The KL-divergence against stored reference log-probs (llmpipe.evaluation.metrics) works on
# blocks of this many positions, holding this many float64 [block x vocab] arrays at once.
KLD_BLOCK = 64
KLD_ARRAYS = 4


def tokens_bound(n_bytes: int) -> int:
    """An upper bound on the tokens of ``n_bytes`` of UTF-8 text (no special tokens)."""
    return -(-n_bytes // BYTES_PER_TOKEN)


def record_width(n_vocab: int) -> int:
    """uint16 words per token in a log-prob base file (llama-perplexity's
    ``--kl-divergence-base`` format): 4 (float32 scale and offset) + vocab, rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4
