"""AdaMix for decoder language models on data-to-text tasks (E2E, WebNLG, DART)."""
