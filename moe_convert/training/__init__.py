"""Training: job configs, data, the shared Accelerate loop, Mixture-of-Students distillation, teacher cache."""
