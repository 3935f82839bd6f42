"""Fusion blocks: how image and text features attend to / combine with each other."""
