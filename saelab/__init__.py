"""saelab: sparse autoencoders for language-model activations."""
__version__ = "0.1.0"
