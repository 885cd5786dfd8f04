"""llmpipe: the tested library behind the LLM life-cycle Snakemake workflow.

Every workflow rule is a thin script over one function of this package. The modules, by stage:

- ``config``      validate the user's config (schema + cross-key checks), the model table
- ``fetch``       download: packaged GGUF, shared folder or hub repo -> HF folder + manifest
- ``stage``       copy a model to the node-local RAM disk and verify it (cache_to_shm)
- ``gguf``        convert an HF folder with llama.cpp's official converter; quantize in-process
- ``manifest``    file lists with sizes and sha256, and their verification
- ``provenance``  versions, git revision, host, hardware: recorded in every result
- ``atomic``      write files and folders so a killed job never leaves a complete-looking output
"""

__version__ = "0.1.0"
