"""The MUSIC model (MusicModel), its de-tokenizer, the 8x8 layout, the procedural world and inference (Generator, MusicPipeline)."""
