"""The GGUF weight types an export can ask for, and its error; torch-free, so validating a study file imports no torch."""

TYPES = ("auto", "q4_1", "q8_0", "f16")  # auto keeps the codes (Q4_1 / Q8_0, float layers F16)
ARCHITECTURES = ("llama",)  # the transformers model_type values the GGUF export writes (llama.cpp's LLM_ARCH_LLAMA)


class ExportError(ValueError):
    """A model or layer that the requested GGUF type cannot hold exactly (and ``lossy`` was off)."""
