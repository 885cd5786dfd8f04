"""FLOPs of fine-tuning, counted per token from the model's shape (``llmpipe.estimate``).

One multiply-add is 2 FLOPs. For a weight matrix of N parameters and one token:

- forward: 2N;
- backward: the gradient with respect to the input, 2N, and with respect to the weight, 2N —
  the latter only for trainable weights.

Full fine-tuning trains every weight: 2N + 4N = **6N per token** (the usual rule, N = all
parameters that multiply, i.e. everything but the embedding lookup; a tied head counts once).

LoRA freezes the base weights, so they cost forward + input gradient = **4N per token**, and the
adapters (N_lora = r x (d_in + d_out) per adapted matrix, trained) cost 6 N_lora. Our training
loop also applies the output head only where a token is scored (the response), so the head's
N_head = vocab x hidden costs 4 N_head per *scored* token instead of per token. Gradient
checkpointing repeats each layer's forward once: + 2 (N_body + N_lora). Attention scores
(Q·K and P·V) add 2 x layers x q_dim x s per token forward, where s is the sequence length,
and twice that backward (their inputs need gradients): 6 x layers x q_dim x s, or 8 x with
checkpointing. So, for T tokens of which L are scored::

    LoRA = T (4 N_body + 6 N_lora + 6 A) + L 4 N_head      [+ T (2 N_body + 2 N_lora + 2 A) with GC]
    full = 6 (N_body + N_head) T + 6 A T                     (the reference, reported beside it)

with A = layers x q_dim x s. N_body is the decoder layers' linear weights. For SmolLM2-135M
(N_body 106.2 M, N_head 28.3 M, LoRA r=16 on all 7 projections: 4.9 M, s ~ 56) LoRA needs 0.70
of the full fine-tune's FLOPs per token when every token is scored, and 0.59 in the default run,
where ~80 % of the tokens are prompt (masked, so the head runs only on the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.estimate import ModelShape


@dataclass(frozen=True)
class FlopCounts:
    body: int  # decoder linear weights (N_body)
    head: int  # output projection (N_head = vocab x hidden)
    lora: int  # trainable adapter parameters (N_lora)
    attn: int  # layers x q_dim (multiply by the sequence length)

    @classmethod
    def of(cls, shape: ModelShape, lora_params: int) -> FlopCounts:
        return cls(
            body=shape.linear_params,
            head=shape.vocab * shape.hidden,
            lora=lora_params,
            attn=shape.n_layers * shape.q_dim,
        )


def lora_flops(
    c: FlopCounts, tokens: int, scored: int, seq_len: float, gradient_checkpointing: bool
) -> float:
    """FLOPs of LoRA training on ``tokens`` tokens (``scored`` of them with a label)."""
    a = c.attn * seq_len
    per_token = 4 * c.body + 6 * c.lora + 6 * a
    if gradient_checkpointing:
        per_token += 2 * c.body + 2 * c.lora + 2 * a
    return tokens * per_token + scored * 4 * c.head


def full_flops(c: FlopCounts, tokens: int, seq_len: float) -> float:
    """FLOPs of full fine-tuning of the same tokens: 6N per token (+ attention)."""
    return tokens * (6 * (c.body + c.head) + 6 * c.attn * seq_len)
