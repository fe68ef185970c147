"""Helpers every layer may use: atomic file writes, disk-space messages, suggestions for misspelt names. Imports nothing else of preftune."""
