"""Generation with vLLM for GRPO (work in progress)."""

FT_FEATURE = True
FT_METHOD_FEATURE = "generation"
