"""The text side: chat template, tokenisation, context checks, incremental detokenisation, stop strings."""
