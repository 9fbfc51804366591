"""Training: batches -> model -> loss -> update, validation, checkpoints and TensorBoard.

`trainer` runs the loop; `step` is one optimizer update (forward, loss, backward, clip, step); `state` is what a
checkpoint holds beyond the weights, how a run resumes and the averaging history; `validation` scores the valid and
test splits through the shared decoder; `board` draws into TensorBoard; `runs` owns run folders, locks and signals;
`optim` builds AdamW and the learning-rate schedules; `distributed` wraps torch.distributed for torchrun.
"""
