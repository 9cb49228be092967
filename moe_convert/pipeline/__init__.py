"""Recipes: the schema, running their steps (resumable), and the report."""
