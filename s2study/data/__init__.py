"""Datasets of cross-modality image pairs and the S2 training batch."""
