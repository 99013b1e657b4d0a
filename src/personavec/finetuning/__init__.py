"""Fine-tuning: conversations, LoRA with training-time edits (preventative steering, CAFT), trait datasets, the
fine-tuning shift, and the paper's fine-tuning experiment (its fluency reading is steering.quality's)."""
