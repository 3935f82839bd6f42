"""Losses shared by the methods."""
