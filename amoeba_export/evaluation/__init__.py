"""Accuracy measurement: perplexity, artifact validation against a reference, multiple-choice tasks."""
