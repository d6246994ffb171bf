"""Tokenizers: text (BPE), item identifiers (atomic, semantic, content) with a prefix trie, and the
VQ image tokenizer. Nothing here imports the model."""
