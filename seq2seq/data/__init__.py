"""Data pipeline, one module per stage: corpus.py (find and read a corpus, keep evaluation splits whole) -> clean.py
(training pairs cleaned on every core into Arrow shards) -> split.py (deduplication and the grouped split on 64-bit
hashes) -> tokenizer.py (SentencePiece) -> prepare.py (`prepare_data`: the cached, tokenized splits the trainer
reads) -> batching.py (token-budget batches). shards.py runs the chunked, parallel passes and holds `Pairs`.

Nothing is imported here, so translating with a checkpoint (tokenizer and batching only) does not load `datasets`.
"""
