"""Analysis of trained models: attention diagnostics (entropy, coverage, agreement, word merging) in
`diagnostics`, the figures drawn from them in `plotting`, attention as terminal text and heatmap files for
translate in `terminal`, the inspector's library in `inspection` (with its `page` and `server`), and the alignment
error rate of attention in `alignment`.
"""
