"""Model merging toolkit: finetune task models, merge them without training, evaluate."""
