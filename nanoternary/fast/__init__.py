"""The speed layer: the model's plain code, run faster. Nothing in ops/ or model.py imports it.

    step.py       the training step on every core (threads.py), with the fused heads: same results
                  as Model.loss_and_grads / Model.nll, proven equal by tests/test_fast.py
    head.py       the full head fused and chunked (never holds the (N, V) logits)
    hier_head.py  the hierarchical head split by classes between cores
    adaptive_head.py  the adaptive head fused, its rows split between cores
    optim.py      the optimizers' elementwise updates in cache-sized pieces, shared between cores
                  (AdamW's as one compiled loop with numba, the optional extra "fast")
    threads.py    the thread pool and the BLAS thread count (threadpoolctl)
    dist.py       data parallelism across processes and machines: MPI (mpiexec -n N python train.py)
    watchdog.py   a lost process (machine, link) ends the job instead of leaving it waiting forever
    profile.py    where the time goes: timed sections, and the model's functions wrapped from outside
"""
