"""Inference: greedy and beam search written once for every model (`search`), and batched, streaming
translation of raw sentences (`predict`) shared by validation, translate, evaluate and inspect.
"""
