"""Model: Qwen3-MoE-style decoder, routing functions, expert paths."""
