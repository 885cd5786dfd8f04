"""evaluate: speed, quality loss and hardware figures of every model x variant x backend.

Modules, by role (heavy imports — torch, transformers, llama_cpp — only inside functions):

- ``metrics``        pure numpy: llama-perplexity's chunked perplexity, KL-divergence, same-top,
                     PPL ratio and their uncertainties; the ``--kl-divergence-base`` file format
- ``figures``        FLOPs, bytes per decode token, achieved bandwidth and roofline from the
                     model's shape (``llmpipe.estimate.ModelShape``) and the measured times
- ``bandwidth``      the CPU read-bandwidth probe and the GPU peak-bandwidth table
- ``records``        sampling settings and one prompt's result
- ``backend``        the backend interface (``Backend`` loads a ``Model``: generate, tokenize,
                     score chunks) and the registry: name -> config section and class
- ``llama_backend``  llama.cpp (llama-cpp-python): load, generate, score chunks, bench
- ``hf_backend``     transformers: batched ``model.generate`` (per-prompt seeds, first-token
                     clock), placement over the granted GPUs, score chunks
- ``farm``           split the prompts into shards and gather the shards' results
- ``jobs``           one function per evaluation rule (the scripts call these), any backend
- ``sweep``          the llama.cpp threads x n_gpu_layers grid (llama-bench's two tests)

How every figure of ``results/eval/{model}/{variant}-{backend}.json`` is computed:

- ``load_s``: staging aside, from the start of loading to a model ready to run (one warm-up
  pass included, so mmap'd weights are resident); mean over the farm's shards.
  ``load_source``: ``ram_disk`` when loaded from the node-local RAM-disk copy, else ``disk``.
- ``prompt_tokens`` / ``generated_tokens``: sums over all prompts; generated tokens are the
  sampled ones, including a final end-of-generation token (the texts file lists the ids).
- ``prefill_tok_s`` = prompt tokens / time of the prompt passes. Decode, two figures of the
  tokens produced by decode steps (all but each prompt's first; sampling included in the
  time): ``decode_tok_s_aggregate`` = those tokens / the time of the decode steps, all
  sequences together (``decode_sequences`` prompts at most share a step: llama.cpp's
  ``parallel``, transformers' ``batch_size``); ``decode_tok_s_per_sequence`` = those tokens /
  the summed time each prompt spent in the steps it took part in (what one prompt's stream
  sees). Equal when one prompt runs at a time.
- ``wall_s``: the farm's wall time, first shard start to last shard end (loads included);
  ``tokens_per_min`` = 60 x generated tokens / ``wall_s``.
- ``peak_rss_mb``: the largest shard's peak resident memory; ``peak_vram_mb``: the largest
  peak GPU memory (torch's reserved memory, or nvidia-smi for llama.cpp); null on the CPU.
- ``gb_disk_to_device``: bytes of weights read from storage (RAM disk or disk) onto the
  compute device, summed over shards (each shard loads the model); with partial GPU offload
  the offloaded share.
- ``flops``, ``bytes_per_token``, ``achieved_gb_s``, ``roofline_pct``: see ``figures``
  (FLOPs ~ 2 x params per token plus attention; bytes per decode token = weights read plus KV
  cache read); ``peak_bandwidth_gb_s`` from the config table (GPU) or the probe (CPU).
- ``ppl``, ``ppl_ratio``, ``kld_mean``, ``kld_p99``, ``same_top_pct`` (and their siblings):
  see ``metrics``; against the F16 GGUF (llama.cpp) or the HF folder (transformers).
"""
