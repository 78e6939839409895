"""Integrations of loader with orchestrators (optional extras)."""
