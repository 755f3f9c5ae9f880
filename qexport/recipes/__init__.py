"""Recipes: their schema, the pass registry and the pipeline that runs them."""
