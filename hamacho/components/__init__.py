"""Shared building blocks handed to every model plugin."""
