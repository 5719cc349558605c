"""What a pass writes: model directories (streamed safetensors shards), PEFT adapters,
the fit file."""
