"""captioner: a small, readable image captioner whose cross-attention you can see."""
