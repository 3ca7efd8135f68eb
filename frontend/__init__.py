"""The text side: chat template, tokenisation, context checks, incremental detokenisation and
stop strings (``text.py``); no engine, no torch."""
