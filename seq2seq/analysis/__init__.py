"""Analysis of trained models: attention diagnostics (entropy, coverage, agreement, word merging) in
`diagnostics`, and the figures drawn from them in `plotting`.
"""
