"""The captioner itself, on torch alone: model parts (`models`), generation, the tokenizer,
image preprocessing (`images`), the checkpoint format and its safety checks (`checkpoint`) and
the inference API (`inference.Captioner`). Nothing here imports Lightning, Hydra, the data
modules or a plotting library (`tests/test_layers.py`)."""
