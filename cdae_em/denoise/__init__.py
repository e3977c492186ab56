"""The denoising stage: the cascade model, its weights, training and fine-tuning, inference, the self-check and its guard."""
