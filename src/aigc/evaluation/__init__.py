"""Evaluation: metrics for text (`text`), images (`images`), music (`music`), reports with a
real-vs-real floor (`report`), and text classifiers / sentiment (`sentiment`, `embeddings`)."""
