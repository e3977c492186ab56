"""The denoising stage: the cascade model, its weights, training and fine-tuning, inference, the blind-spot check."""
