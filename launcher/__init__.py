"""Compose -> validate -> plan -> submit. Never imports torch."""
