"""Recipes: one per task, a YAML config (the defaults) plus a script that runs it end to end."""
