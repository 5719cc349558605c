"""The demo: a tiny Llama trained with GRPO on 3-digit addition, extrapolated and scored."""
