"""Optimizers (filled by the optim layer)."""
