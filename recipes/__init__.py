"""Recipes that ship with launcher."""
