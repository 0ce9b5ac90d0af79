"""Training: a generic optax loop and language-model training of kvjax models."""
