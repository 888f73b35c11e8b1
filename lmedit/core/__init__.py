"""Pieces shared by every editing method; no method names inside."""
