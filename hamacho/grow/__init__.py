"""Grow a trained model with new good images, and merge models trained at several sites."""
