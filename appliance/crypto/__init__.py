"""Encryption at rest for model weights: key ring, envelope (wrapped data keys) and the segmented AEAD file format."""
