"""What is built on the rest: speed and cost benchmarks (`benchmark`), runs side by side
(`compare`), the Hugging Face baseline (`baseline`) and the demo app (`demo`)."""
