"""Data: the shard writer, the streaming pipeline, transforms, tokenizers and the demo set."""
