"""Tune on feedback: ratings -> preference data -> DPO / KTO / SFT -> a new version -> report.

`versions` (find, name and publish model versions), `preference` (store -> training rows),
`text` (`tune_text`: own GPT/LSTM runs and transformers causal LMs), `report` (before/after).
"""
