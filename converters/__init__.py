"""Hugging Face Yi checkpoints to GGUF: reading, tokenizer, tensors, writing, quantization."""
