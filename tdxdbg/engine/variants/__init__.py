"""Patch variants: each a subclass of the upstream VM overriding only the functions its patch changes."""
