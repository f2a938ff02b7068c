"""captioner: a small, readable image captioner whose attention over the image you can see."""
