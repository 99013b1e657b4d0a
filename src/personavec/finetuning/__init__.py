"""Fine-tuning: conversations, LoRA with training-time edits (preventative steering, CAFT), trait datasets, the
fine-tuning shift, a fluency reading, and the paper's fine-tuning experiment."""
