"""Keyed green-list watermarking of generated text (Kirchenbauer et al. 2023) and its detection."""
