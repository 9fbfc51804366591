"""Data pipeline, one module per stage: corpus.py (find, read, clean, split) -> tokenizer.py (SentencePiece) ->
prepare.py (`prepare_data`: the cached, tokenized splits the trainer reads) -> batching.py (token-budget batches).

Nothing is imported here, so translating with a checkpoint (tokenizer and batching only) does not load `datasets`.
"""
