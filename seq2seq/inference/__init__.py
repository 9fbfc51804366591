"""Inference: greedy and beam search written once for every model (`search`), batched, streaming translation of
raw sentences (`predict`) shared by validation, translate, evaluate and inspect, forced decoding of a given target
(`forced`), and translations as output lines (`output`).
"""
