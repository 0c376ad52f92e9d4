"""Training MUSIC and its de-tokenizer: the record reader, the loops, the multi-process entry point."""
