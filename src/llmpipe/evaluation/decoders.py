"""The transformers backend's forward passes during generation, behind one small interface.

``start(ids, mask, positions, capacity)`` runs the prompt pass of a batch and returns the last
position's logits; ``step(tokens, positions)`` feeds one token per row; ``keep(rows)`` drops the
rows that ended. Two implementations:

- ``HFDecoder``: the model's own forward with a ``DynamicCache``; any architecture, any device.
- ``PackedLlamaDecoder``: Llama-family models (``llama``, ``mistral``; SmolLM2 is one) in fp32
  on the CPU. A batched decode step multiplies a handful of rows by every weight matrix, and
  transformers adds ~1,000 small ops and a KV-cache concatenation per step. Here each
  layer's q/k/v and gate/up weights are concatenated and packed once for a small-row matmul,
  residual adds are fused into it, the rotary embedding is one complex multiply, keys and
  values go into a preallocated cache, the prompt pass skips the padding, and the layer loop
  is plain tensor code (~15 ops per layer). The matmul (``evaluate.transformers.cpu_matmul``)
  is ``panel_gemm`` (a small AVX2 kernel built on first use: it streams the weights at the
  memory's speed) or oneDNN's prepacked matmul (``torch.ops.mkldnn``, what PyTorch's own
  compiler emits for frozen CPU linears), which reads them at about half of it. SmolLM2,
  2 cores, a 6-row step: oneDNN 52-64 ms, panel_gemm 31-41 ms (transformers' forward: 151 ms
  at 10 rows).
  It takes the model's linear weights over (packed copies replace them, so memory does not
  double), after checking its logits against the model's own forward on a padded batch; the
  model's forward cannot be used afterwards.

``make_decoder`` picks the packed decoder when it applies and the config allows it, else
``HFDecoder``; the eval JSON records which ran (``decoder``) and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.errors import ConfigError, PipelineError

PACKED_TYPES = ("llama", "mistral")
CPU_MATMULS = ("auto", "panel", "onednn")
# Largest |logit difference| accepted between the packed and the model's own forward, relative
# to the largest |logit| (fp32 with a different summation order: ~1e-6 is typical).
PACKED_TOLERANCE = 1e-4


class HFDecoder:
    """The model's own forward and ``DynamicCache`` (works for every model and device)."""

    name = "transformers"

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.mask = None

    def start(self, input_ids, mask, positions, capacity: int):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def step(self, tokens, positions):
        import torch

        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def keep(self, rows) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


@dataclass
class _Layer:
    """One decoder layer's weights: norms as they are, linears packed (biases may be None)."""

    norm_in: object
    qkv: object
    qkv_bias: object
    out: object
    out_bias: object
    norm_post: object
    gate_up: object
    gate_up_bias: object
    down: object
    down_bias: object


class OneDNNMatmul:
    """oneDNN's matmul on weights pre-packed for ``rows_hint`` rows (``torch.ops.mkldnn``)."""

    name = "oneDNN"

    def __init__(self, rows_hint: int):
        self.hint = max(int(rows_hint), 1)

    @staticmethod
    def available() -> bool:
        import torch

        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )

    def pack(self, weight):
        import torch

        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), self.hint)

    def linear(self, x, packed, bias=None, residual=None):
        """``residual + x @ W.T + bias`` in one call (the add is a fused post-op)."""
        import torch

        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def cpu_matmul(choice: str, rows_hint: int):
    """(matmul, note) for ``evaluate.transformers.cpu_matmul``: ``auto`` = panel_gemm where
    it builds and runs here, else oneDNN; ``panel`` insists on the kernel; ``onednn`` never
    builds it. (None, why) when neither can run."""
    from llmpipe.evaluation import panel_gemm

    if choice not in CPU_MATMULS:
        raise ConfigError(
            f"evaluate.transformers.cpu_matmul: '{choice}' is not one of {CPU_MATMULS}"
        )
    why = "cpu_matmul: onednn"
    if choice != "onednn":
        kernel, why = panel_gemm.load()
        if kernel is not None:
            return kernel, why
        if choice == "panel":
            raise ConfigError(
                f"evaluate.transformers.cpu_matmul: panel, but the kernel cannot run here: {why} "
                "(set cpu_matmul: auto to fall back to oneDNN)"
            )
    if OneDNNMatmul.available():
        return OneDNNMatmul(rows_hint), f"oneDNN matmul ({why})"
    return None, f"no CPU matmul: this torch build has no oneDNN linear ({why})"


def packed_unsupported(model, device: str, dtype: str) -> str | None:
    """Why the packed decoder cannot run this model here (None when it can)."""
    config = model.config
    if device != "cpu" or dtype != "float32":
        return f"runs on the CPU in float32 only (here {device}, {dtype})"
    if config.model_type not in PACKED_TYPES:
        return f"model_type '{config.model_type}' is not one of {PACKED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act '{config.hidden_act}' (expected silu)"
    return None


class PackedLlamaDecoder:
    """Llama-family decode on the CPU with packed weights (module docstring). ``matmul``:
    ``OneDNNMatmul`` or ``panel_gemm.PanelGemm`` (``cpu_matmul``)."""

    name = "packed-llama-cpu"

    def __init__(self, model, rows_hint: int, matmul=None):
        import torch

        config = model.config
        inner = model.model
        attn = inner.layers[0].self_attn
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = config.rms_norm_eps
        self.sliding_window = getattr(config, "sliding_window", None)
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.matmul = matmul if matmul is not None else OneDNNMatmul(rows_hint)
        self.q_end = self.n_heads * self.head_dim
        self.k_end = self.q_end + self.n_kv * self.head_dim
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        tied = model.get_output_embeddings().weight.data_ptr() == self.embed.data_ptr()
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                self.layers.append(self._pack_layer(layer))
                _return_freed_memory()
            self.head = self.matmul.pack(model.lm_head.weight)
            self.head_bias = _bias(model.lm_head)
        if not tied:
            _release(model.lm_head)
            _return_freed_memory()
        self.kv: list = []
        self.mask = None
        self.length = 0

    # -- weights --------------------------------------------------------------------------

    def _pack_layer(self, layer) -> _Layer:
        import torch

        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q_rows = self._interleave(attn.q_proj.weight, self.n_heads)
        k_rows = self._interleave(attn.k_proj.weight, self.n_kv)
        qkv = self.matmul.pack(torch.cat([q_rows, k_rows, attn.v_proj.weight]))
        qkv_bias = _cat_bias(projections)
        if qkv_bias is not None:
            q_end, k_end = self.q_end, self.k_end
            qkv_bias = torch.cat(
                [
                    self._interleave(qkv_bias[:q_end, None], self.n_heads)[:, 0],
                    self._interleave(qkv_bias[q_end:k_end, None], self.n_kv)[:, 0],
                    qkv_bias[k_end:],
                ]
            )
        gate_up = self.matmul.pack(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        gate_up_bias = _cat_bias((mlp.gate_proj, mlp.up_proj))
        packed = _Layer(
            norm_in=layer.input_layernorm.weight,
            qkv=qkv,
            qkv_bias=qkv_bias,
            out=self.matmul.pack(attn.o_proj.weight),
            out_bias=_bias(attn.o_proj),
            norm_post=layer.post_attention_layernorm.weight,
            gate_up=gate_up,
            gate_up_bias=gate_up_bias,
            down=self.matmul.pack(mlp.down_proj.weight),
            down_bias=_bias(mlp.down_proj),
        )
        for module in (*projections, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            _release(module)
        return packed

    def _interleave(self, weight, heads: int):
        """Rows of each head reordered from transformers' rotary layout (dimension i pairs
        with i + head_dim/2) to adjacent pairs (2i, 2i+1), so the rotation is one complex
        multiply. Queries and keys get the same order: their dot products do not change."""
        half = self.head_dim // 2
        rows = weight.view(heads, 2, half, -1).transpose(1, 2)
        return rows.reshape(heads * self.head_dim, -1)

    # -- the interface --------------------------------------------------------------------

    def start(self, input_ids, mask, positions, capacity: int):
        import torch

        rows, width = input_ids.shape
        if self.sliding_window is not None and capacity > self.sliding_window:
            raise ConfigError(
                f"prompt + new tokens ({capacity}) exceed the model's sliding window "
                f"({self.sliding_window}), which the packed decoder does not implement: set "
                "evaluate.transformers.cpu_packed_decode: false"
            )
        # One buffer per layer, keys then values (heads n_kv each): the projection writes both
        # with one copy.
        shape = (rows, 2 * self.n_kv, capacity, self.head_dim)
        self.kv = [torch.zeros(shape) for _ in self.layers]
        self.mask = torch.zeros((rows, capacity), dtype=torch.bool)
        self.mask[:, :width] = mask.bool()
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        # Real tokens never see padding keys; what padding queries get is dropped (``real``).
        allowed = causal[None] & self.mask[:, None, :width]
        self.length = width
        real = mask.reshape(-1).nonzero().squeeze(1)  # only real tokens go through the linears
        return self._forward(input_ids, positions, 0, allowed[:, None], real)

    def step(self, tokens, positions):
        t = self.length
        self.mask[:, t] = True
        self.length = t + 1
        allowed = self.mask[:, None, None, : t + 1]
        return self._forward(tokens[:, None], positions[:, None], t, allowed)

    def keep(self, rows) -> None:
        self.kv = [kv[rows] for kv in self.kv]
        self.mask = self.mask[rows]

    # -- the layer loop ------------------------------------------------------------------

    def _forward(self, ids, positions, start: int, allowed, real=None):
        """Logits of each row's last position. ``real``: the flat indices of the tokens that
        are not padding (prompt pass); the linears see only those, attention the padded grid."""
        import torch
        import torch.nn.functional as F

        rows, n_new = ids.shape
        end = start + n_new
        flat = ids.reshape(-1)
        hidden = self.embed[flat if real is None else flat[real]]  # (tokens, hidden)
        size = (hidden.shape[-1],)
        cos, sin = self.rotary(hidden, positions)  # (rows, n_new, head_dim), halves equal
        half = self.head_dim // 2
        turn = torch.complex(cos[..., :half], sin[..., :half])[:, :, None, :]
        heads = self.n_heads + self.n_kv
        linear = self.matmul.linear
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, size, layer.norm_in, self.eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            if real is not None:
                grid = qkv.new_zeros((rows * n_new, qkv.shape[1]))
                grid[real] = qkv
                qkv = grid
            # Rotary embedding in place, queries and keys at once.
            pairs = qkv[:, : self.k_end].view(rows, n_new, heads, half, 2)
            torch.view_as_complex(pairs).mul_(turn)
            q = qkv[:, : self.q_end].view(rows, n_new, self.n_heads, self.head_dim)
            kv_new = qkv[:, self.q_end :].view(rows, n_new, 2 * self.n_kv, self.head_dim)
            cache = self.kv[i]
            cache[:, :, start:end] = kv_new.transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                cache[:, : self.n_kv, :end],
                cache[:, self.n_kv :, :end],
                attn_mask=allowed,
                scale=self.scaling,
                enable_gqa=True,
            )
            attn = attn.transpose(1, 2).reshape(rows * n_new, self.q_end)
            if real is not None:
                attn = attn[real]
            hidden = linear(attn, layer.out, layer.out_bias, hidden)
            x = F.rms_norm(hidden, size, layer.norm_post, self.eps)
            gate_up = linear(x, layer.gate_up, layer.gate_up_bias)
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            hidden = linear(act, layer.down, layer.down_bias, hidden)
        if real is None:
            last = hidden.view(rows, n_new, -1)[:, -1]
        else:  # left padding: each row's last token is real, the last of its run
            last = hidden[(real // n_new).bincount(minlength=rows).cumsum(0) - 1]
        last = F.rms_norm(last, size, self.final_norm, self.eps)
        return linear(last, self.head, self.head_bias)


def _bias(linear):
    return None if linear.bias is None else linear.bias.detach()


def _cat_bias(linears):
    import torch

    if all(p.bias is None for p in linears):
        return None
    return torch.cat(
        [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in linears]
    ).detach()


def _release(linear) -> None:
    """Drop a linear's weight (its packed copy took over)."""
    import torch

    linear.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)


def _return_freed_memory() -> None:
    """Give the pages of the released weights back to the system now. glibc keeps freed
    blocks below its mmap threshold in the heap (and counted in RSS, which is what Slurm
    limits), so without this the packed copies would add up to the whole model on top."""
    import contextlib
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to do
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _left_padded_probe(model, rows: int = 2, width: int = 6):
    """A small left-padded batch (row 0 shorter) to compare forwards on."""
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones((rows, width), dtype=torch.long)
    mask[0, : width // 2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def make_decoder(
    model, device: str, dtype: str, rows: int, packed: bool = True, matmul: str = "auto"
):
    """(decoder, note): the packed decoder (its matmul chosen by ``cpu_matmul(matmul)``) when
    ``packed`` and it applies and agrees with the model's own forward on a padded batch plus
    two decode steps, else ``HFDecoder``."""
    import torch

    if not packed:
        return HFDecoder(model), "packed decoder off (evaluate.transformers.cpu_packed_decode)"
    why = packed_unsupported(model, device, dtype)
    if why:
        return HFDecoder(model), f"packed decoder not used: {why}"
    kernel, kernel_note = cpu_matmul(matmul, rows)
    if kernel is None:
        return HFDecoder(model), f"packed decoder not used: {kernel_note}"
    ids, mask, positions = _left_padded_probe(model)
    with torch.inference_mode():
        reference = HFDecoder(model)
        expected = [reference.start(ids, mask, positions, ids.shape[1] + 2)]
        nxt = expected[0].argmax(-1)
        pos = positions[:, -1] + 1
        expected.append(reference.step(nxt, pos))
        expected.append(reference.step(nxt, pos + 1))
        decoder = PackedLlamaDecoder(model, rows, kernel)
        got = [decoder.start(ids, mask, positions, ids.shape[1] + 2)]
        got.append(decoder.step(nxt, pos))
        got.append(decoder.step(nxt, pos + 1))
    error = max(
        float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected, strict=True)
    )
    if not error <= PACKED_TOLERANCE:
        raise PipelineError(
            f"packed decoder disagrees with the model's forward (relative logit error "
            f"{error:.2e} > {PACKED_TOLERANCE}): set evaluate.transformers.cpu_packed_decode: "
            "false (and please report the model)"
        )
    return decoder, (
        f"packed decoder, {kernel_note}: relative logit error {error:.1e} vs transformers' forward"
    )
